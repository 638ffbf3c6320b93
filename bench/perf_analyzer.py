"""perf_analyzer against ``isekai`` and ``isekai_segment``: ``scripts/perf-analyzer`` runs this after its
setup.

For each model and concurrency (1, 2, 4) it runs Triton's perf_analyzer (gRPC, real request data: an encoded
photo and a click) and reads Triton's metrics endpoint before and after, so each row has perf_analyzer's
throughput and latency percentiles and the server's own account of the run: requests, failures, and queue vs
compute time per model. Without ``--url`` it starts the embedded Triton on the small-checkpoint repository
(``python -m bench --quick``'s) on free loopback ports.

Request data (``--input-data``): a BYTES input goes as ``b64`` of Triton's serialized form of the tensor (each
element prefixed by its uint32 little-endian length) with an explicit ``shape``; numeric inputs as
``content``. Every request sends the same photo, so after the first one the embedding cache answers:
``isekai_segment`` rows are the further clicks of the interactive loop, ``isekai`` rows the generate call
after them.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

from bench.models import DEFAULT_CACHE, ROOT
from bench.timing import say
from isekai import constants as C
from isekai.client import api

DEFAULT_OUTPUT = ROOT / "bench" / "results"
ASTRONAUT_CLICK = (200.0, 300.0)


def serialize_bytes(*elements: bytes) -> bytes:
    """Triton's serialized BYTES tensor: every element as a uint32 little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def input_data(image: bytes, click: tuple[float, float], steps: int | None) -> dict:
    """perf_analyzer's ``--input-data`` JSON for one request (``steps`` only for ``isekai``)."""
    entry = {
        api.IMAGE: {"b64": base64.b64encode(serialize_bytes(image)).decode("ascii"), "shape": [1]},
        api.POINTS: {"content": [float(click[0]), float(click[1])], "shape": [1, 2]},
        api.LABELS: {"content": [1], "shape": [1]},
    }
    if steps is not None:
        entry[api.STEPS] = {"content": [int(steps)], "shape": [1]}
    return {"data": [entry]}


def parse_csv(text: str) -> dict:
    """perf_analyzer's ``-f`` CSV (one row per concurrency) -> throughput and latency percentiles in ms."""
    row = next(csv.DictReader(io.StringIO(text)))
    us = {key: float(value) for key, value in row.items() if key and value not in (None, "")}
    return {
        "concurrency": int(us["Concurrency"]),
        "throughput_rps": us["Inferences/Second"],
        "p50_ms": us["p50 latency"] / 1e3, "p90_ms": us["p90 latency"] / 1e3,
        "p95_ms": us["p95 latency"] / 1e3, "p99_ms": us["p99 latency"] / 1e3,
    }


def run_one(perf_analyzer: str, model: str, url: str, metrics_url: str, data: Path, concurrency: int,
            requests: int, workdir: Path) -> dict:
    from isekai.client.stats import metrics_delta, model_metrics, settled_model_metrics  # noqa: PLC0415

    out = workdir / f"{model}-c{concurrency}.csv"
    cmd = [perf_analyzer, "-m", model, "-u", url, "-i", "grpc", "--input-data", str(data),
           "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "count_windows",
           "--measurement-request-count", str(requests), "--stability-percentage", "50", "--max-trials", "6",
           "-f", str(out)]
    say(f"perf_analyzer {model} concurrency {concurrency}: {' '.join(cmd[1:])}")
    before = model_metrics(metrics_url)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    models = metrics_delta(before, settled_model_metrics(metrics_url))
    row = {"model": model, "concurrency": concurrency, "wall_s": wall, "exit_code": proc.returncode,
           "models": [m.__dict__ for m in models]}
    public = next((m for m in models if m.model == model), None)
    row["requests"] = public.requests if public else 0
    row["errors"] = public.failures if public else 0
    if proc.returncode == 0 and out.exists():
        row.update(parse_csv(out.read_text()))
    else:
        row["error"] = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    say(f"perf_analyzer {model} concurrency {concurrency}: "
        + (f"{row['throughput_rps']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
           f"{row['errors']} errors" if "throughput_rps" in row else f"failed: {row['error']}"))
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# perf_analyzer: {meta['target']}", "", f"Command: `{meta['command']}`  ",
           f"Date: {meta['date']}  ", f"Machine: {meta['machine']}  ", f"Requests: {meta['requests']}", "",
           "| model | concurrency | req/s | p50 | p95 | p99 | requests | errors |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "throughput_rps" in r:
            out.append(
                f"| {r['model']} | {r['concurrency']} | {r['throughput_rps']:.2f} | {r['p50_ms']:.0f} "
                f"ms | {r['p95_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['requests']} | {r['errors']} |"
            )
        else:
            out.append(f"| {r['model']} | {r['concurrency']} | failed: {' '.join(r['error'])} | | | | "
                       f"{r['requests']} | {r['errors']} |")
    out += ["",
            "Triton's own account of each run (metrics endpoint, before/after): queue vs compute time per "
            "model.", ""]
    for r in rows:
        out += [f"{r['model']}, concurrency {r['concurrency']}:", "",
                "| model | requests | failures | executions | queue ms/request | compute ms/request |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {m['model']} | {m['requests']} | {m['failures']} | {m['executions']} | "
                f"{m['queue_ms']:.1f} | {m['compute_ms']:.1f} |" for m in r["models"]]
        out.append("")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--perf-analyzer", default="perf_analyzer", help="the perf_analyzer binary")
    parser.add_argument("--url", default=None,
                        help="gRPC address of a running server (default: start the embedded Triton on "
                             "--repository)")
    parser.add_argument("--metrics-url", default=None, help="its metrics endpoint, host:port (with --url)")
    parser.add_argument("--repository", type=Path, default=None,
                        help="repository for the embedded server (default: the small checkpoints, made once "
                        "under .cache/bench/quick)")
    parser.add_argument("--models", default=f"{api.SEGMENT_MODEL},{api.SWAP_MODEL}",
                        help="models to load-test")
    parser.add_argument("--concurrency", default="1,2,4", help="concurrency levels")
    parser.add_argument("--steps", type=int, default=C.DEFAULT_STEPS, help="isekai's denoising steps")
    parser.add_argument("--image", type=Path, default=None,
                        help="photo to send (default: skimage's astronaut, 512x512, clicked at 200,300)")
    parser.add_argument("--click", default=None, help="x,y of the click in --image's pixels")
    parser.add_argument("--requests", default=f"{api.SEGMENT_MODEL}=40,{api.SWAP_MODEL}=6",
                        help="requests per measurement window, per model (perf_analyzer "
                             "--measurement-request-count)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where perf-analyzer.{md,json} go")
    parser.add_argument("--name", default="perf-analyzer",
                        help="file name (without extension) of the results")


def _user_args(argv: list[str]) -> list[str]:
    """The arguments as the user gave them to scripts/perf-analyzer (without the binary the script adds)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--perf-analyzer":
            skip = True
        elif not a.startswith("--perf-analyzer="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    import platform  # noqa: PLC0415
    import shlex  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="scripts/perf-analyzer", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.image is not None:
        image = args.image.read_bytes()
        if args.click is None:
            parser.error("--image needs --click x,y")
        click = tuple(float(v) for v in args.click.split(","))
        target_image = args.image.name
    else:
        from bench.scenes import astronaut  # noqa: PLC0415

        image, click, target_image = astronaut().png(), ASTRONAUT_CLICK, "skimage astronaut 512x512"
    per_model = dict(item.split("=") for item in args.requests.split(","))
    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = DEFAULT_CACHE / "perf-analyzer"
    workdir.mkdir(parents=True, exist_ok=True)
    data = {}
    for model in models:
        data[model] = workdir / f"{model}.input-data.json"
        data[model].write_text(json.dumps(input_data(image, click,
                                                     args.steps if model == api.SWAP_MODEL else None)))

    def measure(url: str, metrics_url: str) -> list[dict]:
        rows = []
        for model in models:
            for c in levels:
                rows.append(run_one(args.perf_analyzer, model, url, metrics_url, data[model], c,
                                    int(per_model.get(model, 20)), workdir))
        return rows

    if args.url:
        if not args.metrics_url:
            parser.error("--url needs --metrics-url host:port")
        target = f"server at {args.url}"
        rows = measure(args.url, args.metrics_url)
    else:
        from bench.models import prepare  # noqa: PLC0415
        from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415

        repository = args.repository or prepare("quick", "tiny").repository
        target = f"embedded Triton on {repository} (small checkpoints unless given)"
        options = ServerOptions(repository=repository, grpc_port=free_port(), http_port=free_port(),
                                metrics_port=free_port())
        say(f"starting the embedded Triton on {repository}")
        with TritonServer(options, log_path=workdir / "tritonserver.log") as server:
            rows = measure(server.grpc_url, server.metrics_url)
    from bench.cli import _machine  # noqa: PLC0415

    meta = {"target": target, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": _machine()[0],
            "python": platform.python_version(),
            "command": ("scripts/perf-analyzer "
                        + " ".join(shlex.quote(a) for a in _user_args(argv or sys.argv[1:]))),
            "requests": f"{target_image}, one click at {click[0]:.0f},{click[1]:.0f}; isekai with "
                        f"steps={args.steps} (other options at their defaults); per measurement window: "
                        f"{args.requests}"}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(rows, meta)
    (args.output / f"{args.name}.md").write_text(text)
    print(text)
    failed = [r for r in rows if r["exit_code"] != 0 or r["errors"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
