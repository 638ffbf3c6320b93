"""Random-weight SAM checkpoints in the official on-disk format, and the table of SAM encoder architectures.

The official ``sam_vit_{h,l,b}_*.pth`` files are plain ``state_dict``s of segment-anything's ``Sam`` module,
saved with ``torch.save``. :func:`make_sam_checkpoint` builds the model with segment-anything's own builder
and saves it the same way, so the exporter reads ours and the official ones through one code path.
``"tiny"`` keeps every part of the architecture (windowed and global attention, relative positions, the
full prompt encoder and mask decoder) but shrinks the image encoder so tests run in seconds on a CPU;
``vit_b``/``vit_l``/``vit_h`` are full size, for benchmarks (random weights cost the same to run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from isekai.export.sam_import import Sam, build_sam_from_encoder_config


@dataclass(frozen=True)
class SamEncoderConfig:
    """The part of a SAM architecture that differs between checkpoints: its ViT image encoder."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]  # blocks with global attention; the others use 14x14 windows

    def describe(self) -> str:
        return (
            f"embed dim {self.embed_dim}, {self.depth} blocks, {self.num_heads} heads, "
            f"global attention in blocks {list(self.global_attn_indexes)}"
        )


# The official architectures, as in segment_anything.build_sam.build_sam_vit_{h,l,b}.
SAM_ENCODERS: dict[str, SamEncoderConfig] = {
    "vit_h": SamEncoderConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamEncoderConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamEncoderConfig(768, 12, 12, (2, 5, 8, 11)),
    # Test-size encoder: one windowed and one global block, two heads of 32 channels.
    "tiny": SamEncoderConfig(64, 2, 2, (1,)),
}
OFFICIAL_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")

# Parameters the builder initialises to a constant (zeros for positional embeddings and relative positions,
# ones/zeros for LayerNorm) are jittered by this much, so a random checkpoint exercises every path of the
# graph: with zero relative positions, a wrong rel-pos export would still pass parity.
_CONSTANT_INIT_JITTER = 0.02


def build_sam(model_type: str) -> Sam:
    """An untrained ``Sam`` of the named architecture, in eval mode, from segment-anything's builder."""
    if model_type not in SAM_ENCODERS:
        raise ValueError(f"model_type {model_type!r} is not one of {sorted(SAM_ENCODERS)}")
    config = SAM_ENCODERS[model_type]
    return build_sam_from_encoder_config(
        encoder_embed_dim=config.embed_dim,
        encoder_depth=config.depth,
        encoder_num_heads=config.num_heads,
        encoder_global_attn_indexes=list(config.global_attn_indexes),
    )


def make_sam_checkpoint(path: str | Path, model_type: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SAM of ``model_type`` to ``path`` as a plain state_dict, like the official files.

    The same ``seed`` gives byte-identical weights. Returns ``path``.
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(model_type)
        with torch.no_grad():
            for param in sam.parameters():
                flat = param.reshape(-1)
                if flat.numel() > 1 and bool((flat == flat[0]).all()):
                    param.add_(torch.randn_like(param) * _CONSTANT_INIT_JITTER)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path
