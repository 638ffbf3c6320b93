"""Random-weight SAM checkpoints in the official on-disk format, and the table of SAM encoder architectures.

The official ``sam_vit_{h,l,b}_*.pth`` files are plain ``state_dict``s of segment-anything's ``Sam`` module,
saved with ``torch.save``. :func:`make_sam_checkpoint` builds the model with segment-anything's own builder
and saves it the same way, so the exporter reads ours and the official ones through one code path.
``"tiny"`` keeps every part of the architecture (windowed and global attention, relative positions, the
full prompt encoder and mask decoder) but shrinks the image encoder so tests run in seconds on a CPU;
``vit_b``/``vit_l``/``vit_h`` are full size, for benchmarks (random weights cost the same to run).

``vit_t`` is MobileSAM (``mobile_sam.pt``): the same ``Sam`` with :class:`~isekai.export.tinyvit.TinyViT` as
its image encoder, in the same on-disk format (``image_encoder.`` keys are TinyViT's, the rest are SAM's).
``tiny_t`` is its test-size twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from isekai import constants as C
from isekai.export.sam_import import Sam, build_sam_from_encoder_config
from isekai.export.tinyvit import TinyViT, TinyViTConfig


@dataclass(frozen=True)
class SamEncoderConfig:
    """The part of a SAM architecture that differs between checkpoints: its ViT image encoder."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]  # blocks with global attention; the others use 14x14 windows

    def summary(self) -> str:
        return f"embed dim {self.embed_dim}, {self.depth} blocks"

    def describe(self) -> str:
        return (
            f"embed dim {self.embed_dim}, {self.depth} blocks, {self.num_heads} heads, "
            f"global attention in blocks {list(self.global_attn_indexes)}"
        )


# An image encoder's architecture: segment-anything's ViT, or MobileSAM's TinyViT.
EncoderConfig = SamEncoderConfig | TinyViTConfig

# The official architectures, as in segment_anything.build_sam.build_sam_vit_{h,l,b} and MobileSAM's
# mobile_sam.build_sam.build_sam_vit_t (whose head and window lists also name the conv stage: [2, 4, 5, 10]
# and [7, 7, 14, 7]; see isekai.export.tinyvit).
SAM_ENCODERS: dict[str, EncoderConfig] = {
    "vit_h": SamEncoderConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamEncoderConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamEncoderConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_t": TinyViTConfig(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(4, 5, 10),
                           window_sizes=(7, 14, 7)),
    # Test-size encoder: one windowed and one global block, two heads of 32 channels.
    "tiny": SamEncoderConfig(64, 2, 2, (1,)),
    # Test-size TinyViT: every kind of part (zero-padded windows: 7 at 128 tokens, 14 and 7 at 64; the merge
    # that keeps the resolution; two blocks in a stage), narrow and shallow. The last width stays 320:
    # MobileSAM's own code keeps the 64x64 resolution only for last widths 320/448/576, and the tests compare
    # against it.
    "tiny_t": TinyViTConfig(embed_dims=(16, 32, 64, 320), depths=(1, 1, 2, 1), num_heads=(1, 2, 5),
                            window_sizes=(7, 14, 7), mlp_ratio=2.0),
}
OFFICIAL_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t")

# Parameters the builder initialises to a constant (zeros for positional embeddings and relative positions,
# ones/zeros for LayerNorm) are jittered by this much, so a random checkpoint exercises every path of the
# graph: with zero relative positions, a wrong rel-pos export would still pass parity.
_CONSTANT_INIT_JITTER = 0.02
# TinyViT's attention biases start at zero and are of order one once trained (they are added to scaled
# scores): jittered by 0.02 they would barely move the softmax, so a wrong offset table could pass. Drawn from
# N(0, 1).
_ORDER_ONE_PARAMETERS = ("attn.attention_biases",)


def build_sam_for(config: EncoderConfig) -> Sam:
    """An untrained ``Sam`` with the image encoder ``config`` describes, in eval mode.

    segment-anything's own builder makes the prompt encoder and mask decoder (the same in every SAM,
    MobileSAM's included: its ``build_sam_vit_t`` repeats the same arguments); for a TinyViT, the builder's
    ViT is then replaced by :class:`TinyViT` (the builder is given the test-size ViT, so the replaced one
    costs nothing).
    """
    vit = config if isinstance(config, SamEncoderConfig) else SAM_ENCODERS["tiny"]
    sam = build_sam_from_encoder_config(
        encoder_embed_dim=vit.embed_dim,
        encoder_depth=vit.depth,
        encoder_num_heads=vit.num_heads,
        encoder_global_attn_indexes=list(vit.global_attn_indexes),
    )
    if isinstance(config, TinyViTConfig):
        sam.image_encoder = TinyViT(config, img_size=C.SAM_IMAGE_SIZE)
    return sam.eval()


def build_sam(model_type: str) -> Sam:
    """An untrained ``Sam`` of the named architecture, in eval mode."""
    if model_type not in SAM_ENCODERS:
        raise ValueError(f"model_type {model_type!r} is not one of {sorted(SAM_ENCODERS)}")
    return build_sam_for(SAM_ENCODERS[model_type])


def make_sam_checkpoint(path: str | Path, model_type: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SAM of ``model_type`` to ``path`` as a plain state_dict, like the official files.

    The same ``seed`` gives byte-identical weights. Returns ``path``.
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(model_type)
        with torch.no_grad():
            for name, param in sam.named_parameters():
                if name.endswith(_ORDER_ONE_PARAMETERS):
                    param.copy_(torch.randn_like(param))
                    continue
                flat = param.reshape(-1)
                if flat.numel() > 1 and bool((flat == flat[0]).all()):
                    param.add_(torch.randn_like(param) * _CONSTANT_INIT_JITTER)
            # TinyViT's BatchNorms start at mean 0, variance 1: a BatchNorm dropped by the export would pass.
            for name, buffer in sam.named_buffers():
                if name.endswith("running_mean"):
                    buffer.add_(torch.randn_like(buffer) * _CONSTANT_INIT_JITTER)
                elif name.endswith("running_var"):
                    buffer.mul_(torch.exp(torch.randn_like(buffer) * _CONSTANT_INIT_JITTER))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path
