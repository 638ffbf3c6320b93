"""Real-ESRGAN ``.pth`` / ``.safetensors`` -> the ``upscale`` ONNX graph, with a parity run.

The graph (:func:`esrgan_spec`): ``image`` f32 [1, 3, H, W] RGB in 0..1 -> ``upscaled`` f32 [1, 3, sH, sW],
s the checkpoint's scale (4, 2 or 1). The output is the network's raw value (about 0..1, not clamped), as
Real-ESRGAN's model returns it; the caller clips (``isekai.ensemble.upscale``). H and W are dynamic; the x2
and x1 networks pixel-unshuffle their input by 2 and 4 first, so there they must be multiples of 2 or 4.

The network is RRDBNet as Real-ESRGAN (and BasicSR) define it, written here from its published description:

    [pixel-unshuffle by 4/s] -> conv_first -> body: num_block x RRDB -> conv_body, + the conv_first features
    -> 2 x (nearest x2, conv_up, LeakyReLU 0.2) -> conv_hr, LeakyReLU -> conv_last

An RRDB is three residual dense blocks (``rdb1..rdb3``) and a residual scaled by 0.2; a dense block is five
3x3 convolutions, each seeing the block input and all earlier outputs (num_grow_ch channels each), its last
one back to num_feat channels, also added back scaled by 0.2. The network always upsamples x4 internally,
which is why x2 and x1 unshuffle first.

Checkpoints. The official files (RealESRGAN_x4plus.pth, RealESRGAN_x4plus_anime_6B.pth,
RealESRGAN_x2plus.pth) are ``{"params_ema": state_dict}`` pickles (``params`` in some); ``.safetensors``
files hold the state dict itself. The architecture (scale, num_block, num_feat, num_grow_ch) is read from
the tensors, never from the file name (:func:`infer_config`).

``python -m isekai.cli export esrgan --checkpoint RealESRGAN_x4plus.pth --repository model_repository``
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from isekai import constants as C
from isekai.export.common import (
    GraphSpec,
    ParityReport,
    check_parity,
    check_state_keys,
    destination,
    export_onnx,
    progress,
    random_like,
)
from isekai.export.lama import RESTRICTED_PICKLE

# Where Real-ESRGAN's training code stores the weights in a .pth; it reads params_ema when present.
PARAMS_KEYS = ("params_ema", "params")
SAFETENSORS_SUFFIX = ".safetensors"
IMAGE_CHANNELS = 3  # RGB in and out
RESIDUAL_SCALE = 0.2  # dense-block and RRDB residuals are scaled by this (the trained weights assume it)
LEAKY_SLOPE = 0.2
INTERNAL_UPSCALE = 4  # the network's two nearest-x2 stages; smaller scales unshuffle the input first
# scale -> pixel-unshuffle factor applied to the input (so conv_first sees 3 * factor**2 channels).
UNSHUFFLE = {4: 1, 2: 2, 1: 4}

# Traced at one size, checked at two others (non-square, not the trace size; multiples of 4 so every scale's
# unshuffle divides them): a graph that baked in the trace size would fail the parity run.
TRACE_SIZE = (48, 40)
PARITY_SIZES = ((24, 32), (36, 52))
# Parity tolerance on ~0..1 outputs. onnxruntime and torch sum float32 convolutions in different orders;
# measured max |diff| at PARITY_SIZES with random weights: 1.6e-6..1.9e-6 for RealESRGAN_x4plus (350
# convolutions), 1.7e-6 for anime_6B, 2.4e-6..3.2e-6 for x2plus. A wrong layer is off by 1e-2 or more.
PARITY_ATOL = 1e-4

_BODY_KEY = re.compile(r"body\.(\d+)\.")


@dataclass(frozen=True)
class RRDBConfig:
    """An RRDBNet architecture: what differs between Real-ESRGAN checkpoints."""

    num_block: int  # RRDBs in the body (x4plus: 23, anime_6B: 6)
    num_feat: int  # feature channels (64 in the official files)
    num_grow_ch: int  # channels each dense-block convolution adds (32 in the official files)
    scale: int  # output side / input side: 4, 2 or 1

    def __post_init__(self) -> None:
        if self.scale not in UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be one of {sorted(UNSHUFFLE)} but is {self.scale}")
        if min(self.num_block, self.num_feat, self.num_grow_ch) < 1:
            raise ValueError(f"RRDBNet sizes must be >= 1: {self}")

    @property
    def unshuffle(self) -> int:
        """Pixel-unshuffle factor of the input, hence the multiple H and W must be: 1, 2 or 4."""
        return UNSHUFFLE[self.scale]

    @property
    def in_channels(self) -> int:
        """conv_first's input channels: RGB after the pixel-unshuffle."""
        return IMAGE_CHANNELS * self.unshuffle**2

    def describe(self) -> str:
        return (
            f"x{self.scale}, {self.num_block} RRDB blocks, {self.num_feat} features, "
            f"{self.num_grow_ch} growth channels"
        )


# The released Real-ESRGAN RRDBNet checkpoints (their names are only used to say what was recognised).
OFFICIAL_ARCHITECTURES: dict[str, RRDBConfig] = {
    "RealESRGAN_x4plus": RRDBConfig(num_block=23, num_feat=64, num_grow_ch=32, scale=4),
    "RealESRGAN_x4plus_anime_6B": RRDBConfig(num_block=6, num_feat=64, num_grow_ch=32, scale=4),
    "RealESRGAN_x2plus": RRDBConfig(num_block=23, num_feat=64, num_grow_ch=32, scale=2),
}


# ---------------------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------------------
def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions: [1, F, h, w] -> [1, F, h, w], residual scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        # conv{i} sees the block input plus the i-1 earlier outputs; the last one returns to num_feat.
        self.conv1 = _conv3x3(num_feat, num_grow_ch)
        self.conv2 = _conv3x3(num_feat + num_grow_ch, num_grow_ch)
        self.conv3 = _conv3x3(num_feat + 2 * num_grow_ch, num_grow_ch)
        self.conv4 = _conv3x3(num_feat + 3 * num_grow_ch, num_grow_ch)
        self.conv5 = _conv3x3(num_feat + 4 * num_grow_ch, num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, dim=1)), LEAKY_SLOPE))
        return x + RESIDUAL_SCALE * self.conv5(torch.cat(features, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks in a row, residual scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + RESIDUAL_SCALE * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """Real-ESRGAN's generator; parameter names are the official checkpoints' keys.

    forward(image [1, 3, H, W] f32 RGB ~0..1; H, W multiples of ``config.unshuffle``)
        -> [1, 3, scale*H, scale*W] f32, unclamped.
    """

    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        self.config = config
        feat = config.num_feat
        self.conv_first = _conv3x3(config.in_channels, feat)
        self.body = nn.Sequential(*(RRDB(feat, config.num_grow_ch) for _ in range(config.num_block)))
        self.conv_body = _conv3x3(feat, feat)
        self.conv_up1 = _conv3x3(feat, feat)
        self.conv_up2 = _conv3x3(feat, feat)
        self.conv_hr = _conv3x3(feat, feat)
        self.conv_last = _conv3x3(feat, IMAGE_CHANNELS)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image
        if self.config.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.config.unshuffle)  # [1, 3*u*u, H/u, W/u]
        shallow = self.conv_first(x)
        feat = shallow + self.conv_body(self.body(shallow))
        for conv_up in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv_up(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), LEAKY_SLOPE))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError  # noqa: PLC0415 - only for .safetensors files
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"Real-ESRGAN checkpoint {path}: not a readable safetensors file ({err})") from err


def _read_pickle(path: Path) -> Mapping:
    """The top-level object of a torch.save file, read through the restricted unpickler of export/lama.py.

    That unpickler rebuilds tensors and plain containers and turns any other object the file names into an
    inert placeholder, so no code from the file is imported or run. (``weights_only=True`` would do for the
    official files too; the shared loader also reads community files that pickle extra objects beside the
    weights, and gives one behaviour to every .pth the project opens.)
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except Exception as err:  # zip, pickle, torch and OS errors all mean "unreadable"
        raise ValueError(
            f"Real-ESRGAN checkpoint {path}: not a readable PyTorch checkpoint, truncated or corrupt? "
            f"({type(err).__name__}: {err})"
        ) from err
    if not isinstance(loaded, Mapping):
        raise ValueError(f"Real-ESRGAN checkpoint {path}: holds a {type(loaded).__name__}, expected a dict")
    return loaded


def _weights_of(checkpoint: Mapping, path: Path) -> Mapping:
    """``params_ema`` (the weights Real-ESRGAN ships and its inference uses), else ``params``."""
    key = next((k for k in PARAMS_KEYS if k in checkpoint), None)
    if key is None:
        keys = [str(k) for k in list(checkpoint)[:5]]
        hint = " (a bare state dict: save it as {'params_ema': state_dict} or as .safetensors)" if (
            "conv_first.weight" in checkpoint) else ""
        raise ValueError(
            f"Real-ESRGAN checkpoint {path}: no 'params_ema' or 'params' entry (top-level keys: {keys}){hint}"
        )
    weights = checkpoint[key]
    if not isinstance(weights, Mapping):
        kind = type(weights).__name__
        raise ValueError(f"Real-ESRGAN checkpoint {path}: '{key}' is a {kind}, not a state dict")
    return weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The RRDBNet tensors of a Real-ESRGAN ``.pth`` (``params_ema``/``params``) or ``.safetensors`` file.

    Returns float32 CPU tensors by their official names (fp16 files are widened). Raises ValueError naming the
    file for a missing, truncated or foreign file, or one whose weights are not all tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Real-ESRGAN checkpoint {path}: no such file")
    if path.suffix == SAFETENSORS_SUFFIX:
        weights: Mapping = _read_safetensors(path)
    else:
        weights = _weights_of(_read_pickle(path), path)
    not_tensors = [str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"Real-ESRGAN checkpoint {path}: entries that are not tensors: {not_tensors[:5]}")
    return {str(k): v.float() if v.is_floating_point() else v for k, v in weights.items()}


def _block_indices(state: Mapping[str, torch.Tensor], path: str | Path) -> list[int]:
    indices = sorted({int(m.group(1)) for k in state if (m := _BODY_KEY.match(k))})
    if not indices or indices != list(range(len(indices))):
        raise ValueError(
            f"Real-ESRGAN checkpoint {path}: RRDB blocks body.N are missing or not numbered 0..n-1: "
            f"{indices[:8]}"
        )
    return indices


def _shape(state: Mapping[str, torch.Tensor], key: str, path: str | Path) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"Real-ESRGAN checkpoint {path}: {key} is missing")
    shape = tuple(state[key].shape)
    if len(shape) != 4 or shape[2:] != (3, 3):
        raise ValueError(f"Real-ESRGAN checkpoint {path}: {key} has shape {shape}, expected [out, in, 3, 3]")
    return shape


def infer_config(state: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> RRDBConfig:
    """The architecture, read from the tensors.

    num_feat: conv_first's output channels; scale: conv_first's input channels (3 -> x4, 12 -> x2 after a
    pixel-unshuffle by 2, 48 -> x1 after one by 4); num_block: how many ``body.N`` there are;
    num_grow_ch: ``body.0.rdb1.conv1``'s output channels. :func:`load_esrgan` checks every other tensor.
    """
    if "conv_first.weight" not in state:
        first = list(state)[:5]
        raise ValueError(
            f"Real-ESRGAN checkpoint {path}: not a Real-ESRGAN RRDBNet state dict, no conv_first.weight "
            f"(its first keys: {first})"
        )
    num_feat, in_channels = _shape(state, "conv_first.weight", path)[:2]
    scales = {IMAGE_CHANNELS * u * u: s for s, u in UNSHUFFLE.items()}
    if in_channels not in scales:
        raise ValueError(
            f"Real-ESRGAN checkpoint {path}: conv_first.weight takes {in_channels} input channels; RRDBNet "
            f"takes {', '.join(f'{c} (x{s})' for c, s in sorted(scales.items()))}"
        )
    blocks = _block_indices(state, path)
    num_grow_ch = _shape(state, "body.0.rdb1.conv1.weight", path)[0]
    return RRDBConfig(len(blocks), num_feat=num_feat, num_grow_ch=num_grow_ch, scale=scales[in_channels])


def load_esrgan(checkpoint: str | Path) -> RRDBNet:
    """An RRDBNet in eval mode (float32, CPU): the checkpoint's weights in the architecture they imply."""
    state = read_state_dict(checkpoint)
    model = RRDBNet(infer_config(state, checkpoint))
    check_state_keys(state, model, f"Real-ESRGAN checkpoint {checkpoint}",
                     f"RRDBNet {model.config.describe()}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def official_name(config: RRDBConfig) -> str | None:
    """The released checkpoint with this architecture, if any (for messages only)."""
    return next((name for name, known in OFFICIAL_ARCHITECTURES.items() if known == config), None)


# ---------------------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------------------
def esrgan_spec(scale: int) -> GraphSpec:
    """The ``upscale`` graph for a network of this scale: dynamic H, W (multiples of the unshuffle factor).

    Bounds are the exporter's tracing limits; the pipeline feeds tiles of at most
    UPSCALE_TILE + 2 * UPSCALE_TILE_PAD pixels a side.
    """
    if scale not in UNSHUFFLE:
        raise ValueError(f"scale must be one of {sorted(UNSHUFFLE)} but is {scale}")
    unshuffle = UNSHUFFLE[scale]
    height, width = ("H", "W") if unshuffle == 1 else (f"H/{unshuffle}", f"W/{unshuffle}")
    out_h, out_w = ("H", "W") if scale == 1 else (f"{scale}H", f"{scale}W")
    return GraphSpec(
        model=C.UPSCALE_MODEL,
        inputs={C.ESRGAN_IN_IMAGE: (1, IMAGE_CHANNELS, height, width)},
        outputs={C.ESRGAN_OUT_UPSCALED: (1, IMAGE_CHANNELS, out_h, out_w)},
        bounds={"H": (max(2, unshuffle), 4096), "W": (max(2, unshuffle), 4096)},
    )


def esrgan_inputs(height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ``image`` [1, 3, height, width] uniform in 0..1, by the spec's input name."""
    return {C.ESRGAN_IN_IMAGE: random_like((1, IMAGE_CHANNELS, height, width), low=0.0, high=1.0, seed=seed)}


def _name_axes(path: Path, spec: GraphSpec) -> None:
    """Label the graph's dynamic axes by the spec: image [1, 3, H, W] -> upscaled [1, 3, sH, sW].

    torch.export names them after its own symbols (``2*H_over_2``, ``4*s70``); an input axis stated as
    ``H/2`` (a multiple of 2) is labelled ``H``.
    """
    graph = onnx.load(str(path))
    dims = {**spec.inputs, **spec.outputs}
    for value in (*graph.graph.input, *graph.graph.output):
        for dim, want in zip(value.type.tensor_type.shape.dim, dims[value.name], strict=True):
            if isinstance(want, str):
                dim.dim_param = want.partition("/")[0]
    onnx.save(graph, str(path))


def export_esrgan(
    checkpoint: str | Path,
    repository: str | Path | None = None,
    output: str | Path | None = None,
) -> dict[tuple[int, int], ParityReport]:
    """Export a Real-ESRGAN checkpoint to ``output`` or ``<repository>/upscale/1/model.onnx`` and check it.

    Args:
        checkpoint: a Real-ESRGAN ``.pth`` (``params_ema``/``params``) or ``.safetensors`` RRDBNet file.

    Returns the parity reports (onnxruntime vs PyTorch) by input size (H, W): traced at TRACE_SIZE, checked
    at each of PARITY_SIZES; raises AssertionError past PARITY_ATOL.
    """
    path = destination(C.UPSCALE_MODEL, repository, output)
    progress(f"upscale: loading {checkpoint}")
    model = load_esrgan(checkpoint)
    config = model.config
    known = official_name(config)
    n_params = sum(p.numel() for p in model.parameters())
    progress(
        f"upscale: RRDBNet {config.describe()} ({n_params / 1e6:.1f}M parameters)"
        + (f", the {known} architecture" if known else "")
    )
    spec = esrgan_spec(config.scale)
    export_onnx(model, spec, esrgan_inputs(*TRACE_SIZE), path)
    _name_axes(path, spec)
    return {
        size: check_parity(model, path, esrgan_inputs(*size, seed=1 + i), spec, atol=PARITY_ATOL)
        for i, size in enumerate(PARITY_SIZES)
    }


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, required=True,
        help="Real-ESRGAN RRDBNet weights: a .pth with params_ema/params (read without running pickled code) "
        "or a .safetensors file; x4, x2 or x1 and the block count are read from the tensors",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--repository", type=Path, default=None,
        help=f"Triton model repository: writes DIR/{C.UPSCALE_MODEL}/{C.MODEL_VERSION}/{C.ONNX_FILENAME}",
    )
    where.add_argument("--output", type=Path, default=None, help="write the graph to this file instead")


def main(args: argparse.Namespace) -> int:
    """Run the export; a bad checkpoint prints one line on stderr and returns 2, a parity failure 1."""
    try:
        reports = export_esrgan(args.checkpoint, args.repository, args.output)
    except ValueError as err:
        print(f"isekai export esrgan: error: {err}", file=sys.stderr)
        return 2
    except AssertionError as err:  # check_parity: the graph runs but disagrees with PyTorch
        print(f"isekai export esrgan: parity check failed: {err}", file=sys.stderr)
        return 1
    for (height, width), report in reports.items():
        print(f"{report} at input {height}x{width}")
    return 0
