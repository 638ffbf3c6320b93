"""SAM's side of the server's memory (issue 15, item 4): levers on one encoder run, each in a fresh process.

    python -m bench.sam_memory                    # vit_b: exports it at each --rows first (~2 min each)
    python -m bench.sam_memory --type vit_h       # the same for vit_h (exports of 2.5 GB each)
    python -m bench.sam_memory --quick            # the test-size ViT: a smoke check, figures mean nothing

Every row is one encoder graph run by onnxruntime with the served session options (``bench.encoder_run``:
``model_repository/sam_encoder/config.pbtxt``'s parameters), changed in one thing:

- **global attention in blocks of query rows** (``isekai export sam --attention-rows N``): 64 is
  segment-anything's own attention (the whole 4096 x 4096 score matrix per head at once), the default
  (``SAM_ATTENTION_QUERY_ROWS``) and the other ``--rows`` cut it into blocks;
- **onnxruntime's memory arena** on (onnxruntime's default) vs off (the served setting);
- **the memory pattern** (onnxruntime plans every intermediate buffer of a run as one allocation) on vs off;
- **weight prepacking** (MLAS repacks MatMul weights at session creation) on vs off;
- **intra-op threads** all cores vs one (time; the memory of a thread pool is its stacks);
- **glibc malloc's mmap threshold** fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_=131072`` in the process
  environment) vs glibc's default, which raises the threshold up to 32 MiB as big blocks are freed, so later
  buffers of a few MiB come from the heap and stay resident after they are freed (onnxruntime without its
  arena frees every buffer of a run back to malloc);
- **a stub's interpreter**: the resident set of a fresh Python after the imports a ``sam_encoder`` stub makes
  (numpy, onnxruntime, isekai.serving's adapter), which every Python-backend model pays once.

Writes ``bench/results/sam-memory-<type>.md`` and ``.json`` as the code wrote them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.encoder_run import describe_machine, interpreter_bytes, machine, measure_fresh
from bench.models import DEFAULT_CACHE, sam_graphs
from bench.timing import say, write_results
from isekai import constants as C

RESULTS = Path(__file__).resolve().parent / "results"
# glibc: allocations of 128 KiB and more always mmapped, so freed buffers go back to the kernel at once.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
GIB = 2**30
# What a sam_encoder stub imports before its model loads (isekai/serving/onnx_model.py, less Triton's own
# triton_python_backend_utils, which exists only inside a stub).
STUB_IMPORTS = (
    "numpy",
    "onnxruntime",
    "isekai.ensemble.cache",
    "isekai.ensemble.characters",
    "isekai.serving.ort_errors",
)


@dataclass(frozen=True)
class MemoryLever:
    name: str
    a_label: str  # the served default
    a: dict  # bench.encoder_run.measure's figures
    b_label: str
    b: dict
    verdict: str


def _graph(root: Path, sam_type: str, rows: int) -> Path:
    return sam_graphs(root, sam_type, rows) / C.SAM_ENCODER_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME


def _run(label: str, path: Path, runs: int, **kwargs) -> dict:
    r = measure_fresh(path, runs, **kwargs)
    say(
        f"sam memory: {label}: first run {r['first_run_s']:.2f} s, later {r['run_s']:.2f} s; weights "
        f"{r['weight_bytes'] / GIB:.2f} GiB, loaded +{r['loaded_bytes'] / GIB:.2f}, peak while loading "
        f"+{r['create_peak_bytes'] / GIB:.2f}, peak over the runs +{r['run_peak_bytes'] / GIB:.2f}, "
        f"held +{r['held_bytes'] / GIB:.2f} GiB"
    )
    return r


def _change(a: dict, b: dict) -> str:
    """b against a: peak memory over the runs and run time, in percent."""
    peak = 100 * (b["run_peak_bytes"] / a["run_peak_bytes"] - 1)
    time = 100 * (b["run_s"] / a["run_s"] - 1)
    return f"run peak {peak:+.0f} %, run time {time:+.0f} %"


def levers(root: Path, sam_type: str, rows: list[int], runs: int) -> tuple[list[MemoryLever], dict]:
    default_rows = C.SAM_ATTENTION_QUERY_ROWS
    served = _run(f"served default (rows {default_rows})", _graph(root, sam_type, default_rows), runs)
    default_path = _graph(root, sam_type, default_rows)
    out = []
    for n in rows:
        if n == default_rows:
            continue
        other = _run(f"attention rows {n}", _graph(root, sam_type, n), runs)
        whole = n >= C.SAM_EMBEDDING_SIZE
        label = f"{n} rows" + (" (segment-anything's attention)" if whole else "")
        out.append(
            MemoryLever(
                f"global attention, {default_rows} query rows per block vs {n}",
                f"{default_rows} rows",
                served,
                label,
                other,
                f"{default_rows} kept; {label}: {_change(served, other)}",
            )
        )
    arena = _run("memory arena on", default_path, runs, changes={"enable_cpu_mem_arena": True})
    out.append(
        MemoryLever(
            "onnxruntime memory arena",
            "off (served)",
            served,
            "on",
            arena,
            f"kept off; on: {_change(served, arena)}, held after the runs "
            f"{arena['held_bytes'] / GIB:.2f} vs {served['held_bytes'] / GIB:.2f} GiB",
        )
    )
    pattern = _run("memory pattern off", default_path, runs, changes={"enable_mem_pattern": False})
    out.append(
        MemoryLever(
            "onnxruntime memory pattern",
            "on (served)",
            served,
            "off",
            pattern,
            f"off: {_change(served, pattern)}",
        )
    )
    packed = _run("prepacking off", default_path, runs, config_entries={"session.disable_prepacking": "1"})
    out.append(
        MemoryLever(
            "MatMul weight prepacking",
            "on (served)",
            served,
            "off",
            packed,
            f"off: {_change(served, packed)}, loaded {packed['loaded_bytes'] / GIB:.2f} vs "
            f"{served['loaded_bytes'] / GIB:.2f} GiB",
        )
    )
    one = _run("one intra-op thread", default_path, runs, changes={"intra_op_num_threads": 1})
    out.append(
        MemoryLever(
            "intra-op threads",
            f"{served['threads']} (all cores, served)",
            served,
            "1",
            one,
            f"1 thread: {_change(served, one)}",
        )
    )
    mmap = _run("malloc mmap threshold 128 KiB", default_path, runs, env=MMAP_ENV)
    out.append(
        MemoryLever(
            "glibc malloc mmap threshold",
            "dynamic (glibc default, served)",
            served,
            "fixed 128 KiB",
            mmap,
            f"fixed: {_change(served, mmap)}, loaded {mmap['loaded_bytes'] / GIB:.2f} vs "
            f"{served['loaded_bytes'] / GIB:.2f} GiB, held after the runs "
            f"{mmap['held_bytes'] / GIB:.2f} vs {served['held_bytes'] / GIB:.2f} GiB",
        )
    )
    bare = interpreter_bytes()
    stub = interpreter_bytes(STUB_IMPORTS)
    say(
        f"sam memory: a fresh interpreter {bare / 2**20:.0f} MiB, "
        f"with a stub's imports {stub / 2**20:.0f} MiB"
    )
    return out, {"interpreter_bytes": bare, "stub_imports_bytes": stub, "stub_imports": list(STUB_IMPORTS)}


def report(result: dict) -> str:
    m = result["stub"]
    served = result["served"]
    lines = [
        f"# SAM encoder memory levers: {result['type']} (issue 15, item 4)",
        "",
        f"`{result['command']}` on {describe_machine(result['machine'])}. One encoder run on a 1024x1024 "
        f"input, {result['runs']} run(s) per row, each row a fresh process with the served session options "
        "changed in one thing. Memory is above the bare process (Python, numpy, onnxruntime, the input); "
        "weights are the graph's bytes on disk. Peaks: while the session is created (the file read, graph "
        "optimization, prepacking; transient) and over the runs (what the served process reaches per "
        "encode).",
        "",
        "| lever | a (served) | b | weights | after loading a / b | peak loading a / b "
        "| peak over runs a / b | held after runs a / b | run a / b | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for lever in result["levers"]:
        a, b = lever["a"], lever["b"]
        lines.append(
            f"| {lever['name']} | {lever['a_label']} | {lever['b_label']} "
            f"| {a['weight_bytes'] / GIB:.2f} GiB "
            f"| {a['loaded_bytes'] / GIB:.2f} / {b['loaded_bytes'] / GIB:.2f} GiB "
            f"| {a['create_peak_bytes'] / GIB:.2f} / {b['create_peak_bytes'] / GIB:.2f} GiB "
            f"| {a['run_peak_bytes'] / GIB:.2f} / {b['run_peak_bytes'] / GIB:.2f} GiB "
            f"| {a['held_bytes'] / GIB:.2f} / {b['held_bytes'] / GIB:.2f} GiB "
            f"| {a['run_s']:.2f} / {b['run_s']:.2f} s | {lever['verdict']} |"
        )
    ratio = (served["run_peak_bytes"] + m["stub_imports_bytes"]) / served["weight_bytes"]
    loads = [x for lever in result["levers"] for side in ("a", "b") for x in lever[side]["loadavg"]]
    lines += [
        "",
        f"1-minute load average around the rows: {min(loads):.1f} to {max(loads):.1f} on "
        f"{result['machine']['cores']} cores (above the core count, other work shared the CPUs: times are "
        "then upper bounds; memory is not affected).",
        "",
        f"The served encoder's process at its peak over a run: a stub's interpreter and imports "
        f"({m['stub_imports_bytes'] / 2**20:.0f} MiB; a bare Python {m['interpreter_bytes'] / 2**20:.0f} MiB)"
        f" + {served['run_peak_bytes'] / GIB:.2f} GiB = {ratio:.2f}x its "
        f"{served['weight_bytes'] / GIB:.2f} GiB of weights.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sam_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--type", default=None, help="SAM ViT architecture (default vit_b; --quick: tiny)")
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[C.SAM_EMBEDDING_SIZE, 16, 4],
        help=f"attention query rows to compare with the default {C.SAM_ATTENTION_QUERY_ROWS} "
        f"(default {C.SAM_EMBEDDING_SIZE} 16 4; {C.SAM_EMBEDDING_SIZE} = segment-anything's)",
    )
    parser.add_argument("--runs", type=int, default=2, help="encoder runs per row (default 2: cold + one)")
    parser.add_argument("--quick", action="store_true", help="the test-size ViT: a smoke check")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="the benchmark cache (default .cache/bench)"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the .md/.json go (default bench/results)"
    )
    args = parser.parse_args(argv)
    sam_type = args.type or ("tiny" if args.quick else "vit_b")
    root = args.cache / ("quick" if args.quick else "full")
    rows, stub = levers(root, sam_type, args.rows, args.runs)
    served = rows[0].a
    result = {
        "command": " ".join(["python -m bench.sam_memory", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "type": sam_type,
        "runs": args.runs,
        "served": served,
        "stub": stub,
        "levers": [asdict(r) for r in rows],
    }
    stem = f"sam-memory-{sam_type}"
    write_results(args.results, stem, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
