"""big-lama ``best.ckpt`` + ``config.yaml`` -> the ``lama`` ONNX graph, with a parity run.

The graph (:data:`LAMA_SPEC`): ``image`` f32 [1, 3, H, W] RGB in 0..1 and ``mask`` f32 [1, 1, H, W] (> 0 marks
the hole) -> ``inpainted`` f32 [1, 3, H, W] in 0..1, the image with the hole filled. H and W are dynamic
multiples of 8 (``isekai.constants.LAMA_MODULO``), from LAMA_MIN_SIDE to LAMA_WORKING_SIZE.

How the Fourier units' DFT is exported (``--fft``). Measured on the project's shared 2-core CPU machine,
onnxruntime 1.32 with 2 threads, graphs exported with dynamic H, W, median of 10 runs (5 for whole graphs);
max |onnxruntime - torch.fft| in brackets:

    =============================  =========================  ==============================
    graph, input                   fft="onnx" (ONNX DFT op)   fft="matmul" (cos/sin MatMul)
    =============================  =========================  ==============================
    FourierUnit 1x192x64x64        29.2 ms  (7e-7)            3.4 ms  (1e-6)
    FourierUnit 1x96x128x128       61.4 ms  (1e-6)            9.0 ms  (1e-6)
    FourierUnit 1x192x40x72        146.8 ms (1e-5)            2.0 ms  (7e-7)
    big-lama-sized lama, 512x512   2187 ms                    1223 ms
    big-lama-sized lama, 456x680   8791 ms                    1461 ms
    big-lama-sized lama, 1024x1024 9128 ms                    5277 ms
    =============================  =========================  ==============================

onnxruntime's CPU DFT is 7-9x slower than the matmul form at power-of-two sizes and 40-70x slower (and 10x
less precise) at others, which LaMa crops usually are; the whole graph is 1.7x faster at square power-of-two
sizes and 6x at a typical crop. The matmul matrices are built in the graph from the runtime size (cos/sin
of an outer product of aranges), so H and W stay dynamic. ``matmul`` is the default; ``onnx`` keeps the DFT
operator for runtimes with a fast one.

``python -m isekai.cli export lama --checkpoint big-lama/models/best.ckpt --config big-lama/config.yaml
--repository model_repository``
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import argparse
import builtins
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
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
from isekai.export.ffc import FFCResNetGenerator, generator_from_config

FFT_MODES = ("matmul", "onnx")
DEFAULT_FFT = "matmul"
GENERATOR_PREFIX = "generator."

_H, _W = f"H/{C.LAMA_MODULO}", f"W/{C.LAMA_MODULO}"  # dynamic, multiples of LAMA_MODULO
LAMA_SPEC = GraphSpec(
    model=C.LAMA_MODEL,
    inputs={C.LAMA_IN_IMAGE: (1, 3, _H, _W), C.LAMA_IN_MASK: (1, 1, _H, _W)},
    outputs={C.LAMA_OUT_INPAINTED: (1, 3, _H, _W)},
    bounds={"H": (C.LAMA_MIN_SIDE, C.LAMA_WORKING_SIZE), "W": (C.LAMA_MIN_SIDE, C.LAMA_WORKING_SIZE)},
)
# Traced at one size, checked at another (non-square, non-power-of-two, odd sides at 1/8 scale): a graph that
# baked in the trace size would fail the parity run.
TRACE_SIZE = (128, 96)
PARITY_SIZE = (72, 136)
# Parity tolerance on 0..1 outputs. onnxruntime and torch order float32 sums differently in ~40 convolutions
# and the DFT; measured max|diff|: 4e-7 on the small demo model, 1.2e-6 at big-lama's size (3.6e-6 at
# 512x512). So 1e-4 flags real mistakes (a wrong layer is off by 1e-2 or more) with ample room for rounding.
PARITY_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------------------
# Config and checkpoint.
# ---------------------------------------------------------------------------------------------------------
def load_lama_config(config_yaml: str | Path) -> dict:
    """The resolved ``generator`` section of a LaMa training ``config.yaml`` as a plain dict.

    Only that section is resolved: the real file also holds ``${env:TORCH_HOME}``-style interpolations (under
    ``losses``, ``location``) that would fail here and that the generator does not need.
    """
    path = Path(config_yaml)
    if not path.is_file():
        raise ValueError(f"LaMa config {path}: no such file (expected big-lama/config.yaml)")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, ValueError, OSError) as err:
        kind = type(err).__name__
        raise ValueError(f"LaMa config {path}: not a readable YAML config ({kind}: {err})") from err
    if not OmegaConf.is_dict(config) or "generator" not in config:
        raise ValueError(f"LaMa config {path}: no 'generator' section (is this big-lama/config.yaml?)")
    try:
        generator = OmegaConf.to_container(config.generator, resolve=True)
    except OmegaConfBaseException as err:
        raise ValueError(f"LaMa config {path}: cannot resolve the generator section: {err}") from err
    if not isinstance(generator, dict):
        kind = type(generator).__name__
        raise ValueError(f"LaMa config {path}: 'generator' is a {kind}, expected a mapping")
    return generator


class _Untrusted:
    """Stands in for any class or function a checkpoint names outside the allow-list.

    Calling it, building it, setting its state or items all succeed and do nothing: the checkpoint's structure
    loads, its foreign objects become inert husks, and no code they name is imported or run.
    """

    def __new__(cls, *args: object, **kwargs: object) -> _Untrusted:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"<untrusted {type(self).__qualname__}>"


def _allowed_globals() -> dict[tuple[str, str], object]:
    """What a checkpoint may name and get for real: torch's tensor rebuilding, containers, plain builtins."""
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): _codecs.encode,  # protocol 2 writes bytes as encode(str, 'latin1')
    }
    rebuilders = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                  "_rebuild_parameter_with_state")
    for name in rebuilders:
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    plain = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
             "bytearray", "slice", "range")
    for name in plain:
        allowed[("builtins", name)] = getattr(builtins, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


_ALLOWED = _allowed_globals()
_UNTRUSTED: dict[tuple[str, str], type] = {}


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves only the names in :func:`_allowed_globals`; any other becomes an :class:`_Untrusted`."""

    def find_class(self, module: str, name: str) -> object:
        # Protocol 2 (torch.save's default) writes builtins under their Python 2 names (__builtin__.set); the
        # base find_class would translate them, so the override must too. A lookup in fixed tables, no import.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key not in _UNTRUSTED:
            _UNTRUSTED[key] = type(f"{module}.{name}", (_Untrusted,), {"__module__": __name__})
        return _UNTRUSTED[key]


def _restricted_load(file: object, **kwargs: object) -> object:
    return _CheckpointUnpickler(file, **kwargs).load()


# torch.load's pickle_module: it needs a module-like object with Unpickler, load and __name__.
RESTRICTED_PICKLE = types.ModuleType(
    "isekai_restricted_pickle", "pickle with find_class limited to tensors and plain containers"
)
RESTRICTED_PICKLE.Unpickler = _CheckpointUnpickler
RESTRICTED_PICKLE.load = _restricted_load


def read_checkpoint(path: str | Path) -> dict:
    """Load a LaMa Lightning checkpoint safely: tensors and containers for real, foreign objects inert.

    Why not ``torch.load(weights_only=True)``: the official ``best.ckpt`` pickles more than tensors — its
    ``hyper_parameters`` hold OmegaConf ``DictConfig`` objects, Lightning stores callback state — and the
    weights-only unpickler refuses the whole file for them. Why not ``weights_only=False`` with plain pickle:
    that imports and calls whatever the file names, i.e. runs arbitrary code from a downloaded file (and needs
    omegaconf/lightning at exactly the right versions to succeed). So the file goes through
    :class:`_CheckpointUnpickler`: torch's tensor/storage rebuild functions, OrderedDict and plain builtins
    are resolved; every other global becomes an inert placeholder that is never imported nor run. The
    generator's tensors come through intact; the parts we do not need turn into husks.

    Returns the checkpoint's top-level dict. Raises ValueError naming the file if it is not one.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LaMa checkpoint {path}: no such file (expected big-lama/models/best.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except Exception as err:  # zipfile, pickle, torch and OS errors all mean "not a checkpoint we can read"
        raise ValueError(
            f"LaMa checkpoint {path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"LaMa checkpoint {path}: holds a {type(checkpoint).__name__}, expected a dict")
    return checkpoint


def generator_state(checkpoint: Mapping, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The ``generator.*`` tensors of a Lightning checkpoint (or of a bare state dict), prefix stripped."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        kind = type(state).__name__
        raise ValueError(f"LaMa checkpoint {path}: 'state_dict' is a {kind}, expected a mapping")
    prefix = len(GENERATOR_PREFIX)
    generator = {k[prefix:]: v for k, v in state.items() if str(k).startswith(GENERATOR_PREFIX)}
    if not generator:
        first = [str(k) for k in list(state)[:5]]
        raise ValueError(
            f"LaMa checkpoint {path}: no '{GENERATOR_PREFIX}*' tensors (its keys start with {first})"
        )
    not_tensors = [k for k, v in generator.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"LaMa checkpoint {path}: generator entries that are not tensors: {not_tensors[:5]}")
    return generator


def load_lama_checkpoint(checkpoint: str | Path, config: Mapping | str | Path) -> FFCResNetGenerator:
    """Build the generator ``config`` describes and load ``checkpoint``'s ``generator.*`` tensors strictly.

    Args:
        checkpoint: big-lama ``models/best.ckpt`` (Lightning), or any file whose state dict has
            ``generator.*`` tensors.
        config: the ``config.yaml`` path, or its generator section from :func:`load_lama_config`.

    Returns the generator in eval mode, float32 on the CPU.
    """
    section = load_lama_config(config) if isinstance(config, (str, Path)) else dict(config)
    model = generator_from_config(section)
    state = generator_state(read_checkpoint(checkpoint), checkpoint)
    check_state_keys(state, model, f"LaMa checkpoint {checkpoint}",
                     f"the config's generator (ngf={section.get('ngf')}, n_blocks={section.get('n_blocks')})")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 checkpoints too
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# The exported graph.
# ---------------------------------------------------------------------------------------------------------
class LamaInpainter(nn.Module):
    """The whole LaMa step as one graph: mask the image, run the generator, paste its prediction in the hole.

    forward(image [1, 3, H, W] f32 RGB 0..1, mask [1, 1, H, W] f32, > 0 is the hole)
        -> inpainted [1, 3, H, W] f32 0..1 = hole * prediction + (1 - hole) * image, hole = (mask > 0).

    As in LaMa's own inference, the generator sees the image with the hole zeroed and the binary mask as a 4th
    channel; its output is clamped to 0..1 (LaMa's predict clips the same way when writing 8-bit images).
    """

    def __init__(self, generator: FFCResNetGenerator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hole = (mask > 0).to(image.dtype)
        known = image * (1 - hole)
        prediction = self.generator(torch.cat((known, hole), dim=1)).clamp(0, 1)
        return hole * prediction + (1 - hole) * image


def _check_exportable(generator: FFCResNetGenerator, config: Mapping) -> None:
    modulo = 2 ** generator.n_downsampling
    if C.LAMA_MODULO % modulo:
        raise ValueError(
            f"generator.n_downsampling={generator.n_downsampling} needs H, W multiples of {modulo}, but the "
            f"pipeline pads LaMa inputs to multiples of {C.LAMA_MODULO} (isekai.constants.LAMA_MODULO)"
        )
    if generator.uses_lfu():
        raise ValueError(
            "enable_lfu needs square inputs (as in the official code); the lama graph takes any H, W"
        )
    if config.get("input_nc") != 4 or config.get("output_nc") != 3:
        raise ValueError(
            f"generator input_nc/output_nc are {config.get('input_nc')}/{config.get('output_nc')}; "
            "LaMa with a concatenated mask needs 4/3"
        )


def lama_inputs(height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs by the spec's names: image uniform in 0..1, mask uniform in -1..1 (about half hole)."""
    return {
        C.LAMA_IN_IMAGE: random_like((1, 3, height, width), low=0.0, high=1.0, seed=seed),
        C.LAMA_IN_MASK: random_like((1, 1, height, width), low=-1.0, high=1.0, seed=seed + 1),
    }


def export_lama(
    checkpoint: str | Path,
    config: str | Path,
    repository: str | Path | None = None,
    output: str | Path | None = None,
    fft: str = DEFAULT_FFT,
) -> ParityReport:
    """Export big-lama to ``output`` or ``<repository>/lama/1/model.onnx`` and check it against PyTorch.

    Args:
        checkpoint: big-lama ``models/best.ckpt``.
        config: big-lama ``config.yaml``.
        fft: ``"matmul"`` (default: DFT as cos/sin MatMuls) or ``"onnx"`` (the ONNX DFT operator); see the
            module docstring for the measurements behind the default.

    Returns the parity report (onnxruntime vs PyTorch at PARITY_SIZE, traced at TRACE_SIZE).
    """
    if fft not in FFT_MODES:
        raise ValueError(f"fft must be one of {FFT_MODES}, got {fft!r}")
    path = destination(C.LAMA_MODEL, repository, output)
    progress(f"lama: loading {checkpoint} with {config}")
    section = load_lama_config(config)
    generator = load_lama_checkpoint(checkpoint, section)
    _check_exportable(generator, section)
    n_params = sum(p.numel() for p in generator.parameters())
    progress(
        f"lama: generator ngf={section.get('ngf')} n_blocks={section.get('n_blocks')} "
        f"({n_params / 1e6:.1f}M parameters), DFT as {fft}"
    )
    generator.set_dft("matmul" if fft == "matmul" else "fft")
    model = LamaInpainter(generator).eval()
    export_onnx(model, LAMA_SPEC, lama_inputs(*TRACE_SIZE), path)
    return check_parity(model, path, lama_inputs(*PARITY_SIZE, seed=1), LAMA_SPEC, atol=PARITY_ATOL)


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, required=True,
        help="big-lama models/best.ckpt (a PyTorch-Lightning checkpoint; read without running pickled code)",
    )
    parser.add_argument(
        "--config", type=Path, required=True,
        help="big-lama config.yaml (its generator section gives the architecture)",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--repository", type=Path, default=None, help="Triton model repository: writes DIR/lama/1/model.onnx"
    )
    where.add_argument("--output", type=Path, default=None, help="write the graph to this file instead")
    parser.add_argument(
        "--fft", choices=FFT_MODES, default=DEFAULT_FFT,
        help="how the Fourier units' DFT is exported: 'matmul' (default, cos/sin matrix products, fastest on "
        "onnxruntime CPU) or 'onnx' (the ONNX DFT operator)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the export; a bad checkpoint, config or flag prints one line on stderr and returns 2."""
    try:
        report = export_lama(args.checkpoint, args.config, args.repository, args.output, fft=args.fft)
    except ValueError as err:
        print(f"isekai export lama: error: {err}", file=sys.stderr)
        return 2
    except AssertionError as err:  # check_parity: the graph runs but disagrees with PyTorch
        print(f"isekai export lama: parity check failed: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0
