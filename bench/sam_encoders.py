"""SAM's encoders side by side (issue 15): one encode in-process per architecture, and cold clicks served with
MobileSAM (vit_t).

    python -m bench.sam_encoders             # vit_t, vit_b, vit_h; exports them first (vit_h: minutes)
    python -m bench.sam_encoders --types vit_t vit_b --runs 2 --clicks 2      # a shorter run
    python -m bench.sam_encoders --quick     # test-size encoders (tiny_t, tiny): a smoke check

Full-size random-weight checkpoints are made and exported once into ``.cache/bench/full``
(``bench.models.sam_graphs``, the same cache ``python -m bench`` uses); random weights cost the same to run as
trained ones.

- **In-process**: each encoder graph in a fresh process with the served session options
  (``bench.encoder_run``): session creation, its first run, the median of the later runs, memory above the
  bare process.
- **Served**: the embedded Triton on a click-path repository holding ``--served``'s graphs
  (``isekai_segment``, ``sam_encoder`` and ``embedding_cache`` loaded with explicit model control; LaMa and SD
  are not needed for a click). The very first click after the server is ready (each session's first run
  included), then ``--clicks`` first clicks on new photos (the astronaut at 512x512, new bytes each: the
  embedding cache misses, one SAM encode each, the issue's "cold click"), then a click on a cached photo
  (decoder only). Triton's statistics split each click into its models.

Writes ``bench/results/sam-encoders.md`` and ``.json`` (other ``--types``: ``sam-encoders-<types>.*``;
``--quick``: ``sam-encoders-quick.*``), as the code wrote them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.encoder_run import describe_machine, graph_bytes, machine, measure_fresh
from bench.models import DEFAULT_CACHE, sam_graphs, segment_repository
from bench.timing import median, say, write_results
from isekai import constants as C

RESULTS = Path(__file__).resolve().parent / "results"
FULL_TYPES = ("vit_t", "vit_b", "vit_h")
QUICK_TYPES = ("tiny_t", "tiny")
COLD_CLICK_GOAL_S = 1.5  # issue 15: a cold click with vit_t, served, 2 cores


def in_process(root: Path, types: tuple[str, ...], runs: int) -> dict[str, dict]:
    """Each type's encoder graph measured in a fresh process (see the module docstring)."""
    out = {}
    for sam_type in types:
        path = sam_graphs(root, sam_type) / C.SAM_ENCODER_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME
        say(
            f"sam encoders: {sam_type} in-process, {runs} run(s) "
            f"({graph_bytes(path) / 2**20:.0f} MiB of weights)"
        )
        out[sam_type] = r = measure_fresh(path, runs)
        say(
            f"sam encoders: {sam_type}: session {r['create_s']:.2f} s, "
            f"first run {r['first_run_s']:.2f} s, later "
            f"runs {r['run_s']:.2f} s, peak over the runs +{r['run_peak_bytes'] / 2**30:.2f} GiB"
        )
    return out


def served_clicks(root: Path, sam_type: str, clicks: int, log: Path) -> dict:
    """Cold and cached clicks on the embedded Triton with ``sam_type``'s graphs (see the module docstring)."""
    from bench.scenes import astronaut  # noqa: PLC0415
    from bench.served import MemorySampler, Served  # noqa: PLC0415
    from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415

    repo = segment_repository(root, sam_type)
    options = ServerOptions(
        repository=repo,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        model_control="explicit",
        # preprocess calls these two through BLS (Triton loads an ensemble's own steps by itself).
        load_models=(C.SEGMENT_MODEL, C.SAM_ENCODER_MODEL, C.EMBEDDING_CACHE_MODEL),
    )
    scene = astronaut()
    nonce = f"sam-encoders-{time.time_ns()}"
    say(f"sam encoders: serving {sam_type} from {repo} (log: {log})")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with TritonServer(options, log_path=log) as server:
        ready_s = time.perf_counter() - started
        served = Served(server)
        sampler = MemorySampler(server.process.pid)
        sampler.start()
        try:

            def timed_click(session, point) -> dict:
                seconds, delta, _ = served.timed(session.click, point)
                models = {
                    name: {"runs": s.inferences, "compute_ms": s.compute_ns / 1e6 / max(1, s.inferences)}
                    for name, s in delta.items()
                    if s.inferences
                }
                return {"s": seconds, "models": models, "session": session}

            def click(tag: str) -> dict:
                return timed_click(served.client.segment_session(scene.png(tag)), scene.click)

            first = click(f"{nonce}-first")
            say(f"sam encoders: first click after start {first['s']:.2f} s")
            cold = []
            for i in range(clicks):
                entry = click(f"{nonce}-cold-{i}")
                cold.append(entry)
                say(
                    f"sam encoders: cold click {i + 1}/{clicks}: {entry['s']:.2f} s "
                    f"(encoder {entry['models'].get(C.SAM_ENCODER_MODEL, {}).get('compute_ms', 0):.0f} ms)"
                )
            session = cold[-1]["session"] if cold else first["session"]
            cached = timed_click(session, scene.more_clicks[0][:2])
            say(f"sam encoders: a further click on the cached photo {cached['s'] * 1e3:.0f} ms")
        finally:
            peak = sampler.stop()
            processes = len(sampler.pids)
            served.close()
    for entry in (first, *cold, cached):
        entry.pop("session")
    return {
        "type": sam_type,
        "server_ready_s": ready_s,
        "first_click_after_start": first,
        "cold_clicks": cold,
        "cold_click_p50_s": median([c["s"] for c in cold]),
        "cached_click": cached,
        "peak_rss_bytes": peak,
        "processes": processes,
        "loadavg": [load_before, os.getloadavg()[0]],
        "weight_bytes": sum(
            graph_bytes(repo / m / C.MODEL_VERSION / C.ONNX_FILENAME)
            for m in (C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL)
        ),
    }


def report(result: dict) -> str:
    gib = 2**30
    lines = [
        "# SAM encoders: in-process and served (issue 15)",
        "",
        f"`{result['command']}` on {describe_machine(result['machine'])}. "
        + (
            "Test-size encoders: a smoke check, the times mean nothing. "
            if result["quick"]
            else "Random weights at full size (the same cost as trained ones). "
        )
        + "The photo: the astronaut at 512x512.",
        "",
        "## One encode in-process (served session options, a fresh process each)",
        "",
        "| encoder | weights | session creation | first run | later runs (median) "
        "| peak over the runs, above the bare process |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["in_process"].items():
        lines.append(
            f"| {name} | {r['weight_bytes'] / 2**20:.0f} MiB | {r['create_s']:.2f} s "
            f"| {r['first_run_s']:.2f} s "
            f"| {r['run_s']:.2f} s ({r['runs'] - 1 or 1} run(s)) | {r['run_peak_bytes'] / gib:.2f} GiB |"
        )
    loads = [x for r in result["in_process"].values() for x in r["loadavg"]]
    lines += [
        "",
        f"1-minute load average around these runs: {min(loads):.1f} to {max(loads):.1f} on "
        f"{result['machine']['cores']} cores.",
    ]
    served = result.get("served")
    if served:
        p50 = served["cold_click_p50_s"]
        cold_row = "| cold click (new photo) | not run | | |"
        if p50 is not None:
            met = "yes" if p50 <= COLD_CLICK_GOAL_S else "no"
            cold_row = (
                f"| cold click (new photo, 1 encode), median of {len(served['cold_clicks'])} | {p50:.2f} s | "
                f"<= {COLD_CLICK_GOAL_S} s | {met} |"
            )
        enc = [c["models"].get(C.SAM_ENCODER_MODEL, {}).get("compute_ms") for c in served["cold_clicks"]]
        lines += [
            "",
            f"## Clicks served with {served['type']} (`isekai_segment` over gRPC)",
            "",
            "| measure | value | goal | met |",
            "| --- | ---: | --- | --- |",
            cold_row,
            f"| of which `sam_encoder` compute (median) | {median([e for e in enc if e]) or 0:.0f} ms | | |",
            f"| first click after the server is ready | {served['first_click_after_start']['s']:.2f} s | | |",
            f"| click on the cached photo (decoder only) | {served['cached_click']['s'] * 1e3:.0f} ms | | |",
            f"| server peak RSS (click path: {served['processes']} processes) vs SAM weights | "
            f"{served['peak_rss_bytes'] / gib:.2f} GiB vs {served['weight_bytes'] / gib:.2f} GiB | | |",
            "",
            f"1-minute load average before and after the clicks: {served['loadavg'][0]:.1f}, "
            f"{served['loadavg'][1]:.1f}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sam_encoders", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--types",
        nargs="+",
        default=None,
        help=f"encoders to time in-process (default {' '.join(FULL_TYPES)}; --quick: tiny_t tiny)",
    )
    parser.add_argument(
        "--served",
        default=None,
        help="encoder of the served click measurement (default vit_t; --quick: tiny_t)",
    )
    parser.add_argument("--skip-served", action="store_true", help="in-process figures only")
    parser.add_argument("--runs", type=int, default=3, help="encoder runs per type in-process (default 3)")
    parser.add_argument("--clicks", type=int, default=5, help="cold clicks on new photos, served (default 5)")
    parser.add_argument(
        "--quick", action="store_true", help="test-size encoders: a smoke check, timings mean nothing"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="the benchmark cache (default .cache/bench)"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the .md/.json go (default bench/results)"
    )
    args = parser.parse_args(argv)
    types = tuple(args.types or (QUICK_TYPES if args.quick else FULL_TYPES))
    served_type = args.served or ("tiny_t" if args.quick else "vit_t")
    root = args.cache / ("quick" if args.quick else "full")
    stem = "sam-encoders-quick" if args.quick else "sam-encoders"
    if not args.quick and types != FULL_TYPES:  # a partial run never overwrites the full one's files
        stem += "-" + "-".join(types)
    result = {
        "command": " ".join(["python -m bench.sam_encoders", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "quick": args.quick,
        "in_process": in_process(root, types, args.runs),
    }
    if not args.skip_served:
        result["served"] = served_clicks(root, served_type, args.clicks, root / f"{stem}-server.log")
    write_results(args.results, stem, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
