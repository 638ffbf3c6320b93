"""Exported ONNX graphs -> TensorRT plans (``<repository>/<model>/1/model.plan``), the ``tensorrt`` profile.

GPU only: building a plan needs an NVIDIA GPU and the ``tensorrt`` Python package, as inside the NGC Triton
container (``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``). A plan only runs on the GPU model and TensorRT
version that built it, so build in the container that serves it.

Every dynamic input gets one optimization profile from its :class:`GraphSpec`: the named axes' bounds give
min and max, a typical value gives opt (``--opt AXIS=VALUE`` overrides it). Static dims are fixed.

Graphs with LoRA slots (unet, text_encoder: :mod:`isekai.export.lora_slots`) are built without them: TensorRT
takes no zero-rank weights, and a plan cannot switch adapters per request. Characters that bring weights of
their own get plans of their own instead, ``<repository>/diffusion/characters/<NAME>/<model>.plan``: a LoRA
character's adapter fused into the base weights (:func:`isekai.export.lora_slots.fuse_adapter`), a full
fine-tune's own graph. The ``tensorrt`` profile's unet and text_encoder (Python backend,
:mod:`isekai.serving.trt_session`) load them on first use, least recently used out first, as the default
profile does with its adapters and graphs. Run this again after registering characters: existing plans are
kept.

``isekai export tensorrt --repository model_repository``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import onnx

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.export.common import EXTERNAL_DATA_THRESHOLD, GraphSpec, progress
from isekai.export.lora_slots import SLOT_A, fuse_adapter

# Triton's own default for the onnxruntime TensorRT accelerator in configs/gpu.pbtxt is the same 4 GiB.
DEFAULT_WORKSPACE_BYTES = 4 * 1024**3
# The size TensorRT tunes its kernels for when no --opt is given: what a typical request sends.
# B: the UNet's classifier-free-guidance pair; N: one click plus segment-anything's padding point.
# Axes not listed are tuned at their lower bound. Values are clamped into each spec's bounds.
DEFAULT_OPT = {"B": 2, "N": 2}
# Axes with no bounds in their spec (the same default torch.export gets in GraphSpec.dynamic_shapes).
UNBOUNDED = (1, 4096)
# Modules whose module-level GraphSpec objects describe the exported graphs.
SPEC_MODULES = ("isekai.export.sam", "isekai.export.lama", "isekai.export.sd")

NO_TENSORRT = (
    "TensorRT builds need an NVIDIA GPU and the tensorrt package, e.g. inside the NGC Triton container "
    "(nvcr.io/nvidia/tritonserver:<yy.mm>-py3); here: {error}"
)

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


class TensorRTError(RuntimeError):
    """TensorRT is missing, or it could not parse or build a graph."""


# ---------------------------------------------------------------------------------------------------------
# Optimization profiles (pure Python: unit-tested without a GPU).
# ---------------------------------------------------------------------------------------------------------
def axis_names(spec: GraphSpec) -> set[str]:
    """The named dynamic axes of the spec's inputs, without their "/multiple" suffix."""
    return {d.partition("/")[0] for dims in spec.inputs.values() for d in dims if isinstance(d, str)}


def _axis_range(spec: GraphSpec, axis: str) -> tuple[str, int, int, int]:
    """(name, multiple, lowest, highest) for an axis like "N" or "H/8", from the spec's bounds."""
    name, _, multiple_text = axis.partition("/")
    multiple = int(multiple_text) if multiple_text else 1
    lo, hi = spec.bounds.get(name, UNBOUNDED)
    lowest = max(multiple, -(-lo // multiple) * multiple)  # round up to the multiple, at least one step
    highest = hi // multiple * multiple
    if lowest > highest:
        raise ValueError(f"{spec.model}: axis {axis!r} has no allowed value in bounds {lo}..{hi}")
    return name, multiple, lowest, highest


def profile_shapes(spec: GraphSpec, opt: Mapping[str, int] | None = None) -> Shapes:
    """min/opt/max dims of every input of ``spec``, as ``IOptimizationProfile.set_shape`` takes them.

    ``opt`` maps an axis name ("N", "H") to the size to tune for; it must lie in the axis' bounds and be a
    multiple where the spec says "H/8". Without it, :data:`DEFAULT_OPT` or the axis' lower bound is used.
    """
    opt = dict(opt or {})
    unknown = sorted(set(opt) - axis_names(spec))
    if unknown:
        axes = sorted(axis_names(spec))
        raise ValueError(f"{spec.model}: opt names axes {unknown} that no input has; its axes are {axes}")
    shapes: Shapes = {}
    for input_name, dims in spec.inputs.items():
        lows, opts, highs = [], [], []
        for dim in dims:
            if isinstance(dim, int):
                lows.append(dim)
                opts.append(dim)
                highs.append(dim)
                continue
            name, multiple, lowest, highest = _axis_range(spec, dim)
            if name in opt:
                value = opt[name]
                if not lowest <= value <= highest or value % multiple:
                    raise ValueError(
                        f"{spec.model}: opt {name}={value} is not allowed; {dim} takes multiples of "
                        f"{multiple} in {lowest}..{highest}"
                    )
            else:
                value = min(max(DEFAULT_OPT.get(name, lowest), lowest), highest) // multiple * multiple
            lows.append(lowest)
            opts.append(value)
            highs.append(highest)
        shapes[input_name] = (tuple(lows), tuple(opts), tuple(highs))
    return shapes


def parse_opt(values: Iterable[str]) -> dict[str, int]:
    """``["N=2", "H=512"]`` -> ``{"N": 2, "H": 512}`` (the --opt flag)."""
    parsed: dict[str, int] = {}
    for text in values:
        name, sep, value = text.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise ValueError(f"--opt {text!r} is not AXIS=INTEGER (for example N=2)")
        parsed[name.strip()] = int(value)
    return parsed


# ---------------------------------------------------------------------------------------------------------
# Building a plan.
# ---------------------------------------------------------------------------------------------------------
def import_tensorrt():
    """The tensorrt module, or :class:`TensorRTError` saying what is needed."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as err:  # also OSError-like loader failures surface as ImportError here
        raise TensorRTError(NO_TENSORRT.format(error=f"import tensorrt failed ({err})")) from err


def _major_version(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _network_flags(trt) -> int:
    # TensorRT 8's ONNX parser needs an explicit-batch network; 10 and later only have explicit batch and
    # deprecate the flag.
    if _major_version(trt) < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def _progress_monitor(trt, model: str):
    """A TensorRT progress monitor that reports the top-level build phases, where TensorRT has one (10+)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self._started[phase_name] = time.perf_counter()
                progress(f"{model}: TensorRT {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            if phase_name in self._started:
                seconds = time.perf_counter() - self._started.pop(phase_name)
                progress(f"{model}: TensorRT {phase_name} done in {seconds:.0f}s")

    return _Monitor()


def build_plan(
    onnx_path: str | Path,
    plan_path: str | Path,
    spec: GraphSpec,
    shapes: Shapes | None = None,
    *,
    fp16: bool = True,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Path:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write a serialized engine (plan) to ``plan_path``.

    ``shapes`` gives (min, opt, max) dims per input, by default :func:`profile_shapes` of ``spec``. With
    ``fp16`` TensorRT may run layers in half precision (inputs and outputs stay float32, as in the configs).
    External weight files next to ``onnx_path`` (``model.onnx.data``) are found by the parser.
    """
    trt = import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise TensorRTError(f"{spec.model}: {onnx_path} does not exist; export the ONNX graph first")
    if fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise TensorRTError(
            f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (TensorRT 11 builds strongly typed networks "
            "only): build with --fp32, or use a TensorRT 10 container"
        )
    shapes = profile_shapes(spec) if shapes is None else shapes
    started = time.perf_counter()
    precision = "fp16" if fp16 else "fp32"
    progress(f"{spec.model}: building a TensorRT {trt.__version__} {precision} plan from {onnx_path}")

    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as err:  # the tensorrt wheel imports without a GPU, then fails here
        raise TensorRTError(NO_TENSORRT.format(error=f"no usable CUDA device ({err})")) from err
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{spec.model}: TensorRT could not parse {onnx_path}: {errors}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(inputs) != sorted(spec.input_names):
        raise TensorRTError(f"{spec.model}: {onnx_path} has inputs {inputs}, its spec {spec.input_names}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt, spec.model)
    if monitor is not None:
        config.progress_monitor = monitor

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"{spec.model}: TensorRT could not build {onnx_path} (its log above says why)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    size_mb = plan_path.stat().st_size / 1e6
    progress(f"{spec.model}: wrote {plan_path} ({size_mb:.1f} MB) in {time.perf_counter() - started:.0f}s")
    return plan_path


# ---------------------------------------------------------------------------------------------------------
# The repository.
# ---------------------------------------------------------------------------------------------------------
def graph_specs(modules: Sequence[str] = SPEC_MODULES) -> dict[str, GraphSpec]:
    """The exported graphs' specs, by Triton model name, read from the exporter modules.

    A module-level ``GraphSpec`` counts, and so does a ``<model>_spec(...)`` factory (Stable Diffusion's specs
    take the text encoder's width). Factories are called with 1 for each argument: only fixed dims depend on
    them, and :func:`spec_for_graph` takes fixed dims from the ONNX file itself.
    """
    specs: dict[str, GraphSpec] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # that exporter is not part of this installation
        for name, value in vars(module).items():
            if isinstance(value, GraphSpec):
                specs[value.model] = value
            elif name.endswith("_spec") and name.removesuffix("_spec") in C.ONNX_MODELS and callable(value):
                params = inspect.signature(value).parameters.values()
                required = [p for p in params if p.default is inspect.Parameter.empty]
                spec = value(*[1] * len(required))
                specs.setdefault(spec.model, spec)
    return specs


def spec_for_graph(spec: GraphSpec, onnx_path: str | Path) -> GraphSpec:
    """``spec`` with its fixed input dims read from the ONNX graph, once names and named axes agree."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    actual = {
        v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
        for v in graph.input
        if v.name not in initializers
    }
    where = f"{spec.model}: {onnx_path}"
    if sorted(actual) != sorted(spec.input_names):
        raise ValueError(f"{where} has inputs {sorted(actual)}, its spec {spec.input_names}")
    inputs = {}
    for name, dims in spec.inputs.items():
        if len(actual[name]) != len(dims):
            raise ValueError(f"{where} input {name} has rank {len(actual[name])}, its spec {dims}")
        merged = []
        for want, got in zip(dims, actual[name], strict=True):
            if isinstance(want, str) and got is not None:
                raise ValueError(f"{where} input {name} fixes axis {want!r} to {got}")
            if isinstance(want, int) and got is None:
                raise ValueError(f"{where} input {name} is dynamic where its spec fixes {want}")
            merged.append(want if isinstance(want, str) else got)
        inputs[name] = tuple(merged)
    return dataclasses.replace(spec, inputs=inputs)


def build_repository_plans(
    repository: str | Path,
    models: Sequence[str] | None = None,
    *,
    opt: Mapping[str, int] | None = None,
    fp16: bool = True,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    force: bool = False,
) -> list[Path]:
    """Build ``<repository>/<model>/1/model.plan`` from each ``model.onnx`` beside it.

    ``models`` defaults to every exported graph present. A plan newer than its ONNX file is kept unless
    ``force``. ``opt`` sizes apply to every model that has that axis.
    """
    repository = Path(repository)

    def onnx_file(model: str) -> Path:
        return repository / model / C.MODEL_VERSION / C.ONNX_FILENAME

    if models is None:
        models = [m for m in C.ONNX_MODELS if onnx_file(m).is_file()]
        if not models:
            raise ValueError(f"no exported graphs <model>/1/{C.ONNX_FILENAME} in {repository}: export first")
    unknown = sorted(set(models) - set(C.ONNX_MODELS))
    if unknown:
        raise ValueError(f"--models {unknown} are not exported graphs; choose from {list(C.ONNX_MODELS)}")
    import_tensorrt()  # fail before loading any exporter if there is nothing to build with
    specs = graph_specs()
    plans = []
    for model in models:
        if model not in specs:
            raise ValueError(f"no GraphSpec for {model} in {list(SPEC_MODULES)}")
        source = onnx_file(model)
        if not source.is_file():
            raise ValueError(f"{model}: {source} does not exist; export it first (isekai export ...)")
        spec = spec_for_graph(specs[model], source)
        axes = {k: v for k, v in (opt or {}).items() if k in axis_names(spec)}
        build = dict(shapes=profile_shapes(spec, axes), fp16=fp16, workspace_bytes=workspace_bytes,
                     force=force)
        plans.append(_build_fused(source, None, source.with_name(C.PLAN_FILENAME), spec, **build))
        if model in chars.CHARACTER_MODELS:
            plans += _character_plans(repository, model, source, spec, build)
    return plans


def _has_slots(onnx_path: Path) -> bool:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(i.name.endswith(SLOT_A) for i in graph.input)


def _build_fused(
    source: Path, adapter: Path | None, plan: Path, spec: GraphSpec, *, shapes: Shapes, fp16: bool,
    workspace_bytes: int, force: bool, newer_than: Path | None = None,
) -> Path:
    """Build ``plan`` from ``source``; a graph with LoRA slots is built with ``adapter`` fused in (or the
    slots just removed). A plan newer than its sources is kept unless ``force``."""
    sources = [p for p in (source, adapter, newer_than) if p is not None]
    if plan.is_file() and not force and all(plan.stat().st_mtime >= p.stat().st_mtime for p in sources):
        progress(f"{spec.model}: {plan} is newer than its sources, kept (--force rebuilds)")
        return plan
    if not _has_slots(source):
        return build_plan(source, plan, spec, shapes, fp16=fp16, workspace_bytes=workspace_bytes)
    from isekai.export.adapters import read_adapter  # noqa: PLC0415 - onnxruntime, only for adapters

    model = fuse_adapter(onnx.load(str(source)), read_adapter(adapter) if adapter else None)
    with tempfile.TemporaryDirectory(dir=plan.parent) as tmp:
        plain = Path(tmp) / C.ONNX_FILENAME
        external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
        onnx.save(model, str(plain), save_as_external_data=external, location=f"{C.ONNX_FILENAME}.data")
        return build_plan(plain, plan, spec, shapes, fp16=fp16, workspace_bytes=workspace_bytes)


def _character_plans(repository: Path, model: str, base: Path, spec: GraphSpec, build: dict) -> list[Path]:
    """Plans of ``model`` for the drawable characters that bring weights of their own for it."""
    store = chars.CharacterStore(repository)
    plans = []
    for info in store.infos():
        if info.problem:
            progress(f"{model}: no plan for character {info.name!r}: {info.problem}")
            continue
        character = store.get(info.name)
        form = character.weights.get(model)
        if form is None:
            continue
        folder = store.directory / info.name
        path = chars.weights_path(folder, model, form)
        plan = chars.plan_path(folder, model)
        meta = folder / chars.CHARACTER_FILE
        if form == "adapter":
            plans.append(_build_fused(base, path, plan, spec, newer_than=meta, **build))
        else:
            plans.append(_build_fused(path, None, plan, spec, newer_than=meta, **build))
    return plans



# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository", type=Path, required=True,
        help="Triton model repository holding the exported <model>/1/model.onnx files; plans go beside them",
    )
    parser.add_argument(
        "--models", nargs="+", choices=C.ONNX_MODELS, default=None, metavar="MODEL",
        help=f"models to build (default: every exported graph present); any of {', '.join(C.ONNX_MODELS)}",
    )
    parser.add_argument(
        "--opt", action="append", default=[], metavar="AXIS=SIZE",
        help="size TensorRT tunes a dynamic axis for, e.g. --opt N=2 --opt H=512 (default: typical/lowest)",
    )
    parser.add_argument("--fp32", action="store_true", help="build float32 plans (default: fp16 allowed)")
    parser.add_argument(
        "--workspace-gib", type=float, default=DEFAULT_WORKSPACE_BYTES / 1024**3,
        help="TensorRT workspace memory pool limit in GiB (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild plans that are newer than their ONNX")


def main(args: argparse.Namespace) -> int:
    """Build the plans; a missing TensorRT, a bad flag or a failed build print one line on stderr."""
    try:
        plans = build_repository_plans(
            args.repository,
            args.models,
            opt=parse_opt(args.opt),
            fp16=not args.fp32,
            workspace_bytes=int(args.workspace_gib * 1024**3),
            force=args.force,
        )
    except (TensorRTError, ValueError) as err:
        print(f"isekai export tensorrt: error: {err}", file=sys.stderr)
        return 2
    for plan in plans:
        print(plan)
    return 0
