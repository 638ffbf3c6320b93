"""One SAM encoder graph run in a fresh process, as the server's ``sam_encoder`` runs it: time and memory.

The session is built with the served options (:func:`isekai.serving.ort_options.session_options` on the
``parameters`` of ``model_repository/sam_encoder/config.pbtxt``: all cores, no memory arena), optionally
changed (another arena setting, a session config entry such as ``session.disable_prepacking``). Each
measurement runs in its own spawned interpreter, so one graph's buffers and the allocator's leftovers never
count against the next.

Memory figures are bytes above the process's resident set before the session was made (Python, numpy,
onnxruntime and the input image: the part every stub has anyway):

- ``loaded_bytes``: after the session is created (the weights, and whatever onnxruntime keeps besides them);
- ``create_peak_bytes``: the peak (VmHWM) while the session was created (the model file read, graph
  optimization, weight prepacking);
- ``run_peak_bytes``: the peak over the runs (weights held + the runs' buffers), VmHWM reset after creation;
- ``peak_bytes``: the larger of the two;
- ``held_bytes``: after the runs (what a server keeps between requests).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.timing import median
from isekai import constants as C

ROOT = Path(__file__).resolve().parent.parent
SERVED_CONFIG = ROOT / "model_repository" / C.SAM_ENCODER_MODEL


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    """Start this process's VmHWM over from its current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def graph_bytes(path: Path) -> int:
    """Bytes of an ONNX graph file and its external data: the weights a server loads for it."""
    return sum(p.stat().st_size for p in Path(path).parent.glob(f"{Path(path).name}*") if p.is_file())


def served_options(changes: dict[str, object] | None = None, config_entries: dict[str, str] | None = None):
    """The served ``sam_encoder`` session options, with ``changes`` (``SessionOptions`` attributes, e.g.
    ``enable_cpu_mem_arena``) and extra config entries (e.g. ``session.disable_prepacking``)."""
    from google.protobuf import text_format  # noqa: PLC0415 - the spawned child imports what it needs
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    from isekai.serving.ort_options import session_options  # noqa: PLC0415

    config = text_format.Parse((SERVED_CONFIG / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    options = session_options({key: value.string_value for key, value in config.parameters.items()})
    for key, value in (changes or {}).items():
        setattr(options, key, value)
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    return options


def measure(
    path: str,
    runs: int,
    changes: dict[str, object] | None = None,
    config_entries: dict[str, str] | None = None,
) -> dict:
    """Create a session on ``path``, run it ``runs`` times on a SAM-normalised random image, in this process.

    Returns seconds (``create_s``, ``first_run_s``: the first run of the new session, what a cold click pays;
    ``run_s``: the median of the later runs, or the first when ``runs`` is 1) and bytes (see the module
    docstring)."""
    import onnxruntime as ort  # noqa: PLC0415

    image = np.random.default_rng(0).uniform(-2.2, 2.7, (1, 3, C.SAM_IMAGE_SIZE, C.SAM_IMAGE_SIZE))
    feed = {C.SAM_ENC_IN_IMAGE: image.astype(np.float32)}
    options = served_options(changes, config_entries)
    gc.collect()
    load_before = os.getloadavg()[0]
    before = _status_bytes("VmRSS")
    _reset_peak_rss()
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    create = time.perf_counter() - started
    loaded = _status_bytes("VmRSS") - before
    create_peak = _status_bytes("VmHWM") - before
    _reset_peak_rss()  # the runs' own peak from here
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    run_peak = _status_bytes("VmHWM") - before
    return {
        "create_s": create,
        "first_run_s": times[0],
        "run_s": median(times[1:]) if runs > 1 else times[0],
        "runs": runs,
        "loaded_bytes": loaded,
        "create_peak_bytes": create_peak,
        "run_peak_bytes": run_peak,
        "peak_bytes": max(create_peak, run_peak),
        "held_bytes": _status_bytes("VmRSS") - before,
        "weight_bytes": graph_bytes(Path(path)),
        "threads": options.intra_op_num_threads,
        "arena": options.enable_cpu_mem_arena,
        "mem_pattern": options.enable_mem_pattern,
        # The 1-minute load average before and after: above the core count, something else shared the CPUs.
        "loadavg": [load_before, os.getloadavg()[0]],
    }


def _in_fresh_interpreter(code: str, env: dict[str, str] | None = None) -> object:
    """The JSON value ``code`` prints as its last line, run by a new ``python -c`` (this module's imports
    only: no torch, nothing of this process), with ``env`` added to its environment."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"measurement process failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_fresh(path: Path, runs: int, env: dict[str, str] | None = None, **kwargs) -> dict:
    """:func:`measure` in a new interpreter (nothing of this process's memory counts), with ``env`` added to
    its environment (e.g. glibc's ``MALLOC_MMAP_THRESHOLD_``)."""
    args = json.dumps({"path": str(path), "runs": runs, **kwargs})
    result = _in_fresh_interpreter(
        "import json; from bench.encoder_run import measure; "
        f"print(json.dumps(measure(**json.loads({args!r}))))",
        env,
    )
    return {**result, "env": env or {}}


def interpreter_bytes(modules: tuple[str, ...] = ()) -> int:
    """Resident bytes of a new interpreter after importing ``modules``: what each Python-backend stub holds
    before its model loads anything (the stub's own C++ part and Triton's shared memory come on top)."""
    imports = "".join(f"import {name}; " for name in modules)
    return _in_fresh_interpreter(
        f"{imports}from pathlib import Path; print(next(int(line.split()[1]) * 1024 for line in "
        "Path('/proc/self/status').read_text().splitlines() if line.startswith('VmRSS:')))"
    )


def machine() -> dict:
    """The CPU (model, cores, AVX-512 or not) and the software versions behind a figure."""
    from importlib.metadata import version  # noqa: PLC0415

    info = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    avx512 = sorted(f for f in set(flags) if f.startswith("avx512"))
    simd = "AVX-512" if avx512 else "AVX2" if "avx2" in flags else "no AVX2"
    mem = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": model,
        "cores": os.cpu_count() or 1,
        "simd": simd,
        "avx512": avx512,
        "ram_gib": round(mem / 2**20),
        "software": {n: version(n) for n in ("torch", "onnxruntime", "nvidia-pytriton")},
    }


def describe_machine(facts: dict) -> str:
    avx = f"AVX-512 ({', '.join(facts['avx512'])})" if facts["avx512"] else f"no AVX-512 ({facts['simd']})"
    soft = ", ".join(f"{k} {v}" for k, v in facts["software"].items())
    return f"{facts['cpu']}, {facts['cores']} cores, {avx}, {facts['ram_gib']} GiB RAM; {soft}"
