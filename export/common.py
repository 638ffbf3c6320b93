"""What every exporter shares: one spec per exported graph, the ONNX export itself, and the parity run.

A :class:`GraphSpec` names a graph's inputs and outputs once, with named dynamic axes (``"B"``, ``"H"``), so
``input_names`` cannot drift from the sample tensors and the config.pbtxt test can read the same spec.
Every export ends with :func:`check_parity`: onnxruntime against PyTorch on random inputs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from isekai import constants as C

# A dimension is a fixed size (int) or a named dynamic axis: "B", or "H/8" for an axis that must be a
# multiple of 8 (torch.export needs the divisibility stated to keep strided convolutions symbolic).
Dim = int | str

# Above this many bytes of weights, ONNX needs external data (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its Triton model name, its tensors with their dims, and its limits."""

    model: str
    inputs: Mapping[str, tuple[Dim, ...]]
    outputs: Mapping[str, tuple[Dim, ...]]
    # Bounds for named axes: {"B": (1, 8), "H": (64, 2048)}; used by torch.export and TensorRT profiles.
    bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    opset: int = 18

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    def dynamic_shapes(self) -> dict[str, dict[int, object]]:
        """torch.export dynamic_shapes for the inputs, one shared Dim object per axis name."""
        dims: dict[str, object] = {}

        def dim(name: str) -> object:
            base, _, multiple = name.partition("/")
            if base not in dims:
                lo, hi = self.bounds.get(base, (1, 4096))
                if multiple:
                    m = int(multiple)
                    dims[base] = m * torch.export.Dim(f"{base}_over_{m}", min=max(1, lo // m), max=hi // m)
                else:
                    dims[base] = torch.export.Dim(base, min=lo, max=hi)
            return dims[base]

        return {
            name: {i: dim(d) for i, d in enumerate(shape) if isinstance(d, str)}
            for name, shape in self.inputs.items()
        }


def destination(model: str, repository: str | Path | None, output: str | Path | None) -> Path:
    """Where an exported graph goes: ``--output FILE`` or ``<repository>/<model>/1/model.onnx``."""
    if output is not None:
        return Path(output)
    if repository is None:
        raise ValueError("give --repository DIR (writes <DIR>/<model>/1/model.onnx) or --output FILE")
    return Path(repository) / model / C.MODEL_VERSION / C.ONNX_FILENAME


def progress(message: str) -> None:
    """One line of progress on stderr, so stdout stays parseable."""
    print(f"[isekai export {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.state_dict().values())


def export_onnx(
    module: torch.nn.Module,
    spec: GraphSpec,
    sample: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    dynamo: bool = True,
) -> Path:
    """Export ``module(**sample)`` to ``path`` with the spec's names and dynamic axes.

    The sample dict's keys are the spec's input names in order, so names and tensors cannot drift apart.
    Graphs over 2 GB are written with their weights as external data beside ``path``.
    """
    if list(sample) != spec.input_names:
        raise ValueError(f"{spec.model}: sample inputs {list(sample)} != spec inputs {spec.input_names}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    module = module.eval()
    external = _weight_bytes(module) > EXTERNAL_DATA_THRESHOLD
    args = tuple(sample.values())
    progress(f"{spec.model}: exporting to {path} (opset {spec.opset}{', external data' if external else ''})")
    started = time.perf_counter()
    with torch.no_grad():
        if dynamo:
            dynamic = spec.dynamic_shapes()
            program = torch.onnx.export(
                module,
                args,
                input_names=spec.input_names,
                output_names=spec.output_names,
                opset_version=spec.opset,
                dynamo=True,
                dynamic_shapes=tuple(dynamic[name] for name in spec.input_names),
                external_data=external,
                optimize=True,
                verify=False,
            )
            program.save(str(path), external_data=external)
        else:
            axes = {
                name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
                for name, shape in {**spec.inputs, **spec.outputs}.items()
            }
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                opset_version=spec.opset,
                dynamo=False,
                dynamic_axes=axes,
            )
    progress(f"{spec.model}: exported in {time.perf_counter() - started:.1f}s")
    return path


@dataclass(frozen=True)
class ParityReport:
    """Largest differences between onnxruntime and PyTorch, per output."""

    model: str
    max_abs: Mapping[str, float]
    max_ref: Mapping[str, float]  # largest |PyTorch value|, to read max_abs against

    def worst(self) -> float:
        return max(self.max_abs.values())

    def __str__(self) -> str:
        parts = ", ".join(
            f"{name}: max|ort-torch|={err:.2e} (|torch|<={self.max_ref[name]:.2e})"
            for name, err in self.max_abs.items()
        )
        return f"parity {self.model}: {parts}"


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with all graph optimizations."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # not a warning per LoRA slot ("initializer appears in graph inputs")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    module: torch.nn.Module,
    path: str | Path,
    inputs: Mapping[str, torch.Tensor],
    spec: GraphSpec,
    *,
    atol: float,
    rtol: float = 0.0,
    extra_feeds: Mapping[str, np.ndarray] | None = None,
) -> ParityReport:
    """Run the ONNX file and the module on the same inputs; raise if any output differs past the tolerance.

    The tolerance is stated by each exporter (float32 graphs that reorder reductions differ by ~1e-5
    relative; deep networks accumulate more). ``extra_feeds`` go to onnxruntime only (e.g. LoRA slot factors
    the module already holds).
    """
    session = ort_session(path)
    feeds = {name: t.detach().cpu().numpy() for name, t in inputs.items()} | dict(extra_feeds or {})
    got = session.run(spec.output_names, feeds)
    with torch.no_grad():
        want = module.eval()(*inputs.values())
    if isinstance(want, torch.Tensor):
        want = (want,)
    max_abs: dict[str, float] = {}
    max_ref: dict[str, float] = {}
    failures: list[str] = []
    for name, g, w in zip(spec.output_names, got, want, strict=True):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape:
            failures.append(f"{name}: shape {g.shape} != torch {w.shape}")
            continue
        diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
        max_abs[name] = float(diff.max()) if diff.size else 0.0
        max_ref[name] = float(np.abs(w).max()) if w.size else 0.0
        if not np.all(diff <= atol + rtol * np.abs(w)):
            failures.append(f"{name}: max abs diff {max_abs[name]:.3e} > atol {atol:g} + rtol {rtol:g}")
    if failures:
        raise AssertionError(
            f"{spec.model} ({path}): onnxruntime differs from PyTorch: " + "; ".join(failures)
        )
    report = ParityReport(spec.model, max_abs, max_ref)
    progress(str(report))
    return report


def check_state_keys(
    state: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str, target: str
) -> None:
    """Raise ValueError unless ``state`` has exactly ``model``'s keys and shapes: which keys are unknown or
    missing, or which tensors differ in shape (first three of each). ``source`` names the checkpoint,
    ``target`` the architecture it was read as."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    if missing or unknown:
        raise ValueError(
            f"{source} does not match {target}: {len(unknown)} unknown keys (first: {unknown[:3]}), "
            f"{len(missing)} missing keys (first: {missing[:3]})"
        )
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if state[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"{source}: {len(mismatched)} tensors differ in shape from {target} (checkpoint vs model; "
            f"first: {mismatched[:3]})"
        )


def random_like(shape: Sequence[int], *, low: float = -1.0, high: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A reproducible uniform float32 tensor for parity runs."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=g) * (high - low) + low
