"""SAM checkpoint (.pth) -> ``sam_encoder`` and ``sam_decoder`` ONNX graphs, with a parity run.

``load_sam`` reads the official ``sam_vit_{h,l,b}_*.pth`` files and MobileSAM's ``mobile_sam.pt`` (``vit_t``:
a TinyViT image encoder, :mod:`isekai.export.tinyvit`), all plain state dicts, and our small ones from
:mod:`isekai.export.make_sam`, and can tell the architecture from the tensors themselves.

The two graphs:

* ``sam_encoder``: ``image`` f32 [1, 3, 1024, 1024], RGB normalised with SAM's pixel mean/std and zero-padded
  at the bottom/right to 1024 (``Sam.preprocess``) -> ``image_embeddings`` f32 [1, 256, 64, 64]. The same for
  every encoder, so a vit_t repository serves exactly like a vit_h one. A ViT's global attention is exported a
  block of query rows at a time (:mod:`isekai.export.sam_attention`: same numbers, 1/8 of the score buffers).
* ``sam_decoder``: segment-anything's own ONNX decoder interface (``SamOnnxModel``, single mask): prompts in
  the 1024 frame, ``orig_im_size`` = (H, W) of the original photo; ``masks`` are logits at H x W.

``python -m isekai.cli export sam --checkpoint sam_vit_h_4b8939.pth --repository model_repository``
``python -m isekai.cli export sam --checkpoint mobile_sam.pt --model-type vit_t --repository DIR``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F

from isekai import constants as C
from isekai.export.common import (
    GraphSpec,
    ParityReport,
    check_parity,
    destination,
    export_onnx,
    progress,
    random_like,
)
from isekai.export.make_sam import (
    OFFICIAL_MODEL_TYPES,
    SAM_ENCODERS,
    EncoderConfig,
    SamEncoderConfig,
    build_sam_for,
)
from isekai.export.sam_attention import blocked_global_attention
from isekai.export.sam_import import Sam, SamOnnxModel
from isekai.export.tinyvit import TINYVIT_MARKER, infer_tinyvit_config

MODEL_TYPES = ("auto", *OFFICIAL_MODEL_TYPES)

# Prompt points per decoder call: the clicks, the two corners of a box (labels 2 and 3) and segment-anything's
# padding point (label -1, added when there is no box).
SAM_MAX_PROMPT_POINTS = C.MAX_POINTS + 3

_EMBEDDING_SHAPE = (1, C.SAM_EMBEDDING_CHANNELS, C.SAM_EMBEDDING_SIZE, C.SAM_EMBEDDING_SIZE)
_LOW_RES_SHAPE = (1, 1, C.SAM_LOW_RES_SIZE, C.SAM_LOW_RES_SIZE)

SAM_ENCODER_SPEC = GraphSpec(
    model=C.SAM_ENCODER_MODEL,
    inputs={C.SAM_ENC_IN_IMAGE: (1, 3, C.SAM_IMAGE_SIZE, C.SAM_IMAGE_SIZE)},
    outputs={C.SAM_ENC_OUT_EMBEDDINGS: _EMBEDDING_SHAPE},
)

SAM_DECODER_SPEC = GraphSpec(
    model=C.SAM_DECODER_MODEL,
    inputs={
        C.SAM_DEC_IN_EMBEDDINGS: _EMBEDDING_SHAPE,
        C.SAM_DEC_IN_POINT_COORDS: (1, "N", 2),  # (x, y) in pixels of the 1024 frame
        C.SAM_DEC_IN_POINT_LABELS: (1, "N"),  # 1 foreground, 0 background, 2/3 box corners, -1 padding
        C.SAM_DEC_IN_MASK_INPUT: _LOW_RES_SHAPE,  # a previous low_res_masks, or zeros
        C.SAM_DEC_IN_HAS_MASK_INPUT: (1,),  # 1.0 when mask_input is used, else 0.0
        C.SAM_DEC_IN_ORIG_IM_SIZE: (2,),  # (H, W) of the original photo, float32
    },
    outputs={
        C.SAM_DEC_OUT_MASKS: (1, 1, "H", "W"),  # logits at the photo's size; > SAM_MASK_THRESHOLD is the mask
        C.SAM_DEC_OUT_IOU: (1, 1),
        C.SAM_DEC_OUT_LOW_RES: _LOW_RES_SHAPE,
    },
    bounds={"N": (1, SAM_MAX_PROMPT_POINTS)},
)

# The tensor every ViT SAM checkpoint has, and MobileSAM's (TinyViT) counterpart; with neither, the file holds
# some other model.
_PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"
_TINYVIT_KEY = f"image_encoder.{TINYVIT_MARKER}"
_BLOCK_PREFIX = "image_encoder.blocks."
_WINDOW_SIZE = 14  # segment-anything's windowed attention; rel_pos tables have 2 * size - 1 rows


class SamCheckpointError(ValueError):
    """A checkpoint file that is unreadable, not SAM, or not the architecture asked for."""


# ---------------------------------------------------------------------------------------------------------
# Loading checkpoints.
# ---------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a SAM ``.pth`` (a plain state dict), read with ``weights_only=True``, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint {path} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling arbitrary bytes fails with arbitrary exception types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SamCheckpointError(
            f"{path} is not a readable PyTorch checkpoint (torch.load with weights_only=True failed: "
            f"{first_line}); official SAM checkpoints are plain state dicts saved with torch.save"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamCheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors like the official SAM files"
        )
    if _PATCH_EMBED_KEY not in state and _TINYVIT_KEY not in state:
        some = ", ".join(list(state)[:3]) or "none"
        raise SamCheckpointError(
            f"{path} is not a SAM checkpoint: no {_PATCH_EMBED_KEY} (SAM) or {_TINYVIT_KEY} (MobileSAM) "
            f"(its first keys: {some})"
        )
    return dict(state)


def infer_encoder_config(
    state: Mapping[str, torch.Tensor], path: str | Path = "checkpoint"
) -> EncoderConfig:
    """The image encoder's architecture, read from tensor shapes: a TinyViT's (MobileSAM,
    :func:`~isekai.export.tinyvit.infer_tinyvit_config`) or a ViT's, as follows.

    embed dim: patch_embed output channels; depth: number of blocks; heads: embed dim / the rel-pos tables'
    channels (one head's width); global-attention blocks: rel-pos tables spanning the whole 64x64 grid
    (2*64-1 rows) rather than a 14x14 window (2*14-1 rows).
    """
    if _TINYVIT_KEY in state:
        try:
            return infer_tinyvit_config(state)
        except ValueError as err:
            raise SamCheckpointError(
                f"{path}: a MobileSAM (TinyViT) checkpoint that does not fit: {err}"
            ) from err
    embed_dim = int(state[_PATCH_EMBED_KEY].shape[0])
    block_keys = (k.removeprefix(_BLOCK_PREFIX) for k in state if k.startswith(_BLOCK_PREFIX))
    blocks = sorted({int(k.split(".")[0]) for k in block_keys})
    if not blocks or blocks != list(range(len(blocks))):
        raise SamCheckpointError(f"{path}: image encoder blocks are missing or not numbered 0..n-1: {blocks}")
    global_rows, window_rows = 2 * C.SAM_EMBEDDING_SIZE - 1, 2 * _WINDOW_SIZE - 1
    head_dim = None
    global_blocks = []
    for i in blocks:
        key = f"{_BLOCK_PREFIX}{i}.attn.rel_pos_h"
        if key not in state:
            raise SamCheckpointError(f"{path}: {key} is missing (SAM encoders use relative positions)")
        rows, head_dim = (int(n) for n in state[key].shape)
        if rows == global_rows:
            global_blocks.append(i)
        elif rows != window_rows:
            raise SamCheckpointError(
                f"{path}: {key} has {rows} rows; SAM has {window_rows} (windowed) or {global_rows} (global)"
            )
    if head_dim is None or embed_dim % head_dim:
        raise SamCheckpointError(f"{path}: embed dim {embed_dim} is not a multiple of head dim {head_dim}")
    return SamEncoderConfig(embed_dim, len(blocks), embed_dim // head_dim, tuple(global_blocks))


def _name_of(config: EncoderConfig) -> str | None:
    return next((name for name, known in SAM_ENCODERS.items() if known == config), None)


def load_sam(checkpoint: str | Path, model_type: str = "auto") -> Sam:
    """A ``Sam`` in eval mode with the checkpoint's weights.

    ``model_type`` "auto" builds whatever encoder the file holds; "vit_h"/"vit_l"/"vit_b"/"vit_t" (or "tiny",
    "tiny_t") insist on that architecture and raise :class:`SamCheckpointError` naming the file when it
    differs.
    """
    path = Path(checkpoint)
    if model_type != "auto" and model_type not in SAM_ENCODERS:
        raise SamCheckpointError(f"model type {model_type!r} is not one of {['auto', *SAM_ENCODERS]}")
    state = read_state_dict(path)
    found = infer_encoder_config(state, path.name)
    if model_type != "auto" and found != SAM_ENCODERS[model_type]:
        what = _name_of(found) or "custom SAM"
        wanted = SAM_ENCODERS[model_type]
        raise SamCheckpointError(
            f"{path.name} is a {what} checkpoint ({found.summary()}) but --model-type {model_type} was given "
            f"({model_type}: {wanted.summary()}); pass --model-type auto or the matching type"
        )
    sam = build_sam_for(found)
    try:
        sam.load_state_dict(state)
    except RuntimeError as err:
        raise SamCheckpointError(f"{path.name}: weights do not fit SAM ({found.describe()}): {err}") from err
    progress(f"loaded {path.name}: {_name_of(found) or 'custom SAM'} ({found.describe()})")
    return sam.eval()


# ---------------------------------------------------------------------------------------------------------
# The decoder's export wrapper.
# ---------------------------------------------------------------------------------------------------------
class SamDecoderGraph(SamOnnxModel):
    """``SamOnnxModel(return_single_mask=True)`` rewritten where it resists torch.export, same arithmetic.

    * ``select_masks`` multiplies the Python int ``num_points`` into a float tensor, which the ONNX
      translator cannot do with a symbolic int; here the point count is a tensor summed from the labels.
    * ``mask_postprocessing`` reads the crop and output sizes out of ``orig_im_size``. Traced, those sizes
      become constants of the example; here they stay runtime values (unbacked ints with stated bounds), so
      ``masks`` follows ``orig_im_size`` at every aspect ratio.
    """

    def __init__(self, model: Sam) -> None:
        super().__init__(model, return_single_mask=True)

    def forward(  # segment-anything's decoder interface
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shapes and units as in :data:`SAM_DECODER_SPEC`; returns masks, iou_predictions, low_res_masks."""
        masks, scores = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=self._embed_points(point_coords, point_labels),
            dense_prompt_embeddings=self._embed_masks(mask_input, has_mask_input),
        )
        num_points = torch.ones_like(point_labels).sum(dim=1, keepdim=True)  # [B, 1], float
        masks, scores = self.select_masks(masks, scores, num_points)
        return self.mask_postprocessing(masks, orig_im_size), scores, masks

    def select_masks(
        self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token 0 (the single-mask output) for 3+ points, else the best of the multimask tokens by IoU.

        masks [B, 4, 256, 256], iou_preds [B, 4], num_points [B, 1] -> ([B, 1, 256, 256], [B, 1]).
        """
        # The official trick: a +-1000 weight on token 0's score, so the choice is an argmax, not a branch.
        token0 = torch.zeros_like(iou_preds[:1])
        token0[:, 0] = 1000.0
        best = torch.argmax(iou_preds + (num_points - 2.5) * token0, dim=1, keepdim=True)
        return (
            torch.take_along_dim(masks, best[:, :, None, None], dim=1),
            torch.take_along_dim(iou_preds, best, dim=1),
        )

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, 256, 256] -> [B, 1, H, W]: upscale to 1024, drop the padding, resize to (H, W)."""
        size = self.img_size
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        prepadded = self.resize_longest_image_size(orig_im_size, size)
        crop_h, crop_w = prepadded[0].item(), prepadded[1].item()
        out_size = orig_im_size.to(torch.int64)
        out_h, out_w = out_size[0].item(), out_size[1].item()
        # Bounds torch.export needs to slice and resize with values only known at run time.
        for value, upper in ((crop_h, size), (crop_w, size), (out_h, None), (out_w, None)):
            torch._check(value >= 1)
            if upper is not None:
                torch._check(value <= upper)
        masks = masks[..., :crop_h, :crop_w]
        return F.interpolate(masks, size=(out_h, out_w), mode="bilinear", align_corners=False)


def _name_output_axes(path: Path, spec: GraphSpec) -> None:
    """Give the outputs' dynamic axes the spec's names (the exporter calls data-dependent sizes u0, u1...)."""
    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, want in zip(dims, spec.outputs[output.name], strict=True):
            if isinstance(want, str):
                dim.dim_param = want
    onnx.save(model, str(path))


# ---------------------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------------------
def encoder_sample(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ``image`` in the range of SAM-normalised pixels ((0 - mean) / std .. (255 - mean) / std)."""
    shape = SAM_ENCODER_SPEC.inputs[C.SAM_ENC_IN_IMAGE]
    return {C.SAM_ENC_IN_IMAGE: random_like(shape, low=-2.2, high=2.7, seed=seed)}


def decoder_sample(
    orig_im_size: tuple[int, int], labels: tuple[float, ...], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random decoder inputs: embeddings, len(labels) points anywhere in the 1024 frame, a random prior mask.

    ``orig_im_size`` is (H, W) in pixels; ``labels`` are the points' labels (1, 0, 2, 3 or -1).
    """
    n = len(labels)
    return {
        C.SAM_DEC_IN_EMBEDDINGS: random_like(_EMBEDDING_SHAPE, seed=seed),
        C.SAM_DEC_IN_POINT_COORDS: random_like((1, n, 2), low=0.0, high=C.SAM_IMAGE_SIZE, seed=seed + 1),
        C.SAM_DEC_IN_POINT_LABELS: torch.tensor([labels], dtype=torch.float32),
        C.SAM_DEC_IN_MASK_INPUT: random_like(_LOW_RES_SHAPE, low=-10.0, high=10.0, seed=seed + 2),
        C.SAM_DEC_IN_HAS_MASK_INPUT: torch.ones(1),
        C.SAM_DEC_IN_ORIG_IM_SIZE: torch.tensor(orig_im_size, dtype=torch.float32),
    }


def export_sam(
    checkpoint: str | Path,
    model_type: str = "auto",
    repository: str | Path | None = None,
    encoder_output: str | Path | None = None,
    decoder_output: str | Path | None = None,
    attention_rows: int = C.SAM_ATTENTION_QUERY_ROWS,
) -> list[ParityReport]:
    """Export the checkpoint's encoder and decoder, then check both against PyTorch in onnxruntime.

    Writes ``<repository>/sam_encoder/1/model.onnx`` and ``<repository>/sam_decoder/1/model.onnx`` (or the two
    explicit output paths). A ViT encoder's global attention is exported ``attention_rows`` query rows of the
    64x64 map at a time (64: all at once, segment-anything's own code); the parity run compares the graph with
    segment-anything's unchanged attention. Returns the parity reports: encoder, then decoder.
    """
    enc_path = destination(C.SAM_ENCODER_MODEL, repository, encoder_output)
    dec_path = destination(C.SAM_DECODER_MODEL, repository, decoder_output)
    progress(f"loading SAM checkpoint {checkpoint} (model type {model_type})")
    sam = load_sam(checkpoint, model_type)

    with blocked_global_attention(sam.image_encoder, attention_rows) as changed:
        if changed:
            progress(
                f"{C.SAM_ENCODER_MODEL}: {changed} global-attention blocks exported "
                f"{attention_rows} query rows at a time"
            )
        export_onnx(sam.image_encoder, SAM_ENCODER_SPEC, encoder_sample(), enc_path)
    # Example: one click plus the padding point on a portrait photo. N and orig_im_size stay symbolic.
    export_onnx(SamDecoderGraph(sam), SAM_DECODER_SPEC, decoder_sample((1280, 720), (1.0, -1.0)), dec_path)
    _name_output_axes(dec_path, SAM_DECODER_SPEC)

    progress("parity: onnxruntime against PyTorch on random inputs")
    # Encoder: its output ends in a LayerNorm (values of order 1); float32 kernels that reorder the sums
    # of 12-32 attention blocks (or TinyViT's 10) drift by ~1e-5 per block, so 1e-3 absolute is two orders
    # above that noise and far below any real mistake. The module here has segment-anything's own attention
    # back.
    encoder = check_parity(sam.image_encoder, enc_path, encoder_sample(seed=1), SAM_ENCODER_SPEC, atol=1e-3)
    # Decoder: checked against segment-anything's own SamOnnxModel (not our wrapper), at another aspect ratio
    # and point count than the export example, so a size baked into the graph would fail here. Logits reach
    # tens, hence the relative term.
    decoder = check_parity(
        SamOnnxModel(sam, return_single_mask=True),
        dec_path,
        decoder_sample((720, 1280), (1.0, 0.0, -1.0), seed=3),
        SAM_DECODER_SPEC,
        atol=1e-3,
        rtol=1e-3,
    )
    return [encoder, decoder]


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, required=True,
        help="SAM .pth checkpoint: an official sam_vit_{h,l,b}_*.pth, MobileSAM's mobile_sam.pt, or one made "
        "by `isekai export demo`",
    )
    parser.add_argument(
        "--model-type", choices=MODEL_TYPES, default="auto",
        help="encoder architecture (vit_t: MobileSAM); 'auto' (default) reads it from the checkpoint, a "
        "named type is checked",
    )
    parser.add_argument(
        "--attention-rows", type=int, default=C.SAM_ATTENTION_QUERY_ROWS,
        help=f"query rows of the {C.SAM_EMBEDDING_SIZE}x{C.SAM_EMBEDDING_SIZE} token map per block of a "
        f"ViT's global attention (default {C.SAM_ATTENTION_QUERY_ROWS}; {C.SAM_EMBEDDING_SIZE}: the whole "
        "score matrix at once, as segment-anything computes it)",
    )
    parser.add_argument(
        "--repository", type=Path, default=None,
        help="Triton model repository: writes DIR/sam_encoder/1/model.onnx and DIR/sam_decoder/1/model.onnx",
    )
    parser.add_argument(
        "--encoder-output", type=Path, default=None,
        help="write the encoder graph to this file instead of the repository (needs --decoder-output too)",
    )
    parser.add_argument(
        "--decoder-output", type=Path, default=None,
        help="write the decoder graph to this file instead of the repository (needs --encoder-output too)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the export; a bad checkpoint or bad flags print one line on stderr and return 2."""
    try:
        if args.repository is None and (args.encoder_output is None or args.decoder_output is None):
            raise ValueError("give --repository DIR, or both --encoder-output FILE and --decoder-output FILE")
        if not 1 <= args.attention_rows <= C.SAM_EMBEDDING_SIZE:
            raise ValueError(
                f"--attention-rows should be in [1, {C.SAM_EMBEDDING_SIZE}] but is {args.attention_rows}"
            )
        reports = export_sam(
            args.checkpoint, args.model_type, args.repository, args.encoder_output, args.decoder_output,
            args.attention_rows,
        )
    except ValueError as err:
        print(f"isekai export sam: error: {err}", file=sys.stderr)
        return 2
    except AssertionError as err:  # check_parity: the graph runs but disagrees with PyTorch
        print(f"isekai export sam: parity check failed: {err}", file=sys.stderr)
        return 1
    for report in reports:
        print(report)
    return 0
