"""Clicks on a cached photo while someone else's new photo is encoding: ``python -m bench.cold_encode``.

What issue 16 asks to measure: the p50 latency of cached clicks (``isekai_segment`` on a photo whose embedding
is cached: preprocess, the cache lookup, sam_decoder, segment_mask) while cold encodes run, against the same
clicks on an idle server (goal: at most 2x).

A cold encode has to last for the measurement to mean anything: on the tests' tiny SAM it is ~0.2 s, shorter
than a click's own round trip. So by default the SAM graphs are the full-size ``vit_b`` (random weights, the
real architecture: ~9 s per encode on 2 cores), exported once by the benchmark's own code
(``bench/models.py``, ``.cache/bench/full/graphs``); every other model is the small demo one (clicks never
reach them). ``--sam tiny`` runs the same code on the demo SAM in a minute, as a smoke check.

Each configuration is a fresh server on its own copy of the repository, loading only what ``isekai_segment``
needs:

- **1 instance, nice 0**: one preprocess instance (as before issue 16: a click waits for the encode in front
  of it);
- **2 instances, nice 0**: two preprocess instances sharing the ``embedding_cache`` model;
- **2 instances, nice 10** (as shipped): and sam_encoder's threads at niceness 10, so the kernel runs the
  clicks' stages first while an encode holds every core.

For each: ``--clicks`` sequential clicks on the cached photo with nothing else running (idle), then the same
while another client sends new photos back to back (each one a cold encode); only clicks that started and
ended while an encode was in flight count. Results go to ``bench/results/cold-encode.md`` and ``.json``
(``--sam tiny``: under the cache folder).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from bench.models import DEFAULT_CACHE, ROOT, prepare, sam_graphs
from bench.timing import say
from isekai import constants as C

DEFAULT_OUTPUT = ROOT / "bench" / "results"
GOAL_RATIO = 2.0
# (name, preprocess instances, sam_encoder niceness)
CONFIGS = (
    ("1 instance, nice 0", 1, 0),
    ("2 instances, nice 0", 2, 0),
    ("2 instances, nice 10 (shipped)", 2, 10),
)
# What isekai_segment needs: the ensemble loads its steps; the models called through BLS are named too.
SEGMENT_MODELS = (C.SEGMENT_MODEL, C.SAM_ENCODER_MODEL, C.EMBEDDING_CACHE_MODEL)
CLICK = (200.0, 300.0)  # the astronaut's chest


def photo(tag: int) -> bytes:
    """The astronaut with one pixel set from ``tag``: new bytes, so a cold cache key, per tag."""
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415
    from skimage import data  # noqa: PLC0415

    rgb = data.astronaut().copy()
    rgb[0, 0] = (tag % 256, (tag // 256) % 256, 99)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def repository_for(base: Path, sam_part: Path | None, instances: int, nice: int, workdir: Path) -> Path:
    """A copy of ``base`` (configs and the small graphs) with the full-size SAM graphs and the configuration's
    preprocess instances and sam_encoder niceness."""
    repo = workdir / f"repository-{instances}-{nice}"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(base, repo, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    if sam_part is not None:
        for path in sam_part.rglob("*"):
            if path.is_file() and path.name != ".done":
                target = repo / path.relative_to(sam_part)
                target.unlink(missing_ok=True)
                target.hardlink_to(path)
    pre = repo / C.PREPROCESS_MODEL / "config.pbtxt"
    text, n = re.subn(
        r"instance_group \[ \{ count: \d+", f"instance_group [ {{ count: {instances}", pre.read_text()
    )
    assert n == 1, f"{pre}: no instance_group count"
    pre.write_text(text)
    enc = repo / C.SAM_ENCODER_MODEL / "config.pbtxt"
    text, n = re.subn(r'(key: "nice" value: \{ string_value: )"\d+"', rf'\1"{nice}"', enc.read_text())
    assert n == 1, f"{enc}: no nice parameter"
    enc.write_text(text)
    return repo


def measure(repository: Path, clicks: int, log: Path) -> dict:
    """Click latencies (ms) on a cached photo, idle and during back-to-back cold encodes (a fresh server)."""
    from isekai.client.client import IsekaiClient  # noqa: PLC0415
    from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415

    options = ServerOptions(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        model_control="explicit",
        load_models=SEGMENT_MODELS,
    )
    with TritonServer(options, log_path=log) as server:
        client = IsekaiClient(server.grpc_url, attempts=1)
        cached = photo(0)
        started = time.perf_counter()
        client.segment(cached, [CLICK])  # encodes it once, then it is cached
        first_s = time.perf_counter() - started
        for _ in range(3):  # warm the decoder's kernels
            client.segment(cached, [CLICK])
        idle = []
        for _ in range(clicks):
            t0 = time.perf_counter()
            client.segment(cached, [CLICK])
            idle.append((time.perf_counter() - t0) * 1000)

        encoding = threading.Event()
        stop = threading.Event()
        encodes: list[float] = []

        def cold_photos() -> None:
            other = IsekaiClient(server.grpc_url, attempts=1)
            tag = 1
            while not stop.is_set():
                encoding.set()
                t0 = time.perf_counter()
                other.segment(photo(tag), [CLICK])
                encodes.append(time.perf_counter() - t0)
                encoding.clear()
                tag += 1
            other.close()

        background = threading.Thread(target=cold_photos)
        background.start()
        during: list[float] = []
        deadline = time.monotonic() + max(120.0, 40 * first_s)
        try:
            while len(during) < clicks and time.monotonic() < deadline:
                if not encoding.is_set():
                    time.sleep(0.01)
                    continue
                t0 = time.perf_counter()
                client.segment(cached, [CLICK])
                took = (time.perf_counter() - t0) * 1000
                if encoding.is_set():  # the encode was still running when the click came back
                    during.append(took)
        finally:
            stop.set()
            background.join()
            client.close()
    p50_idle, p50_during = statistics.median(idle), statistics.median(during) if during else float("nan")
    return {
        "first_click_s": first_s,
        "idle_ms": idle,
        "during_ms": during,
        "encode_s": encodes,
        "p50_idle_ms": p50_idle,
        "p50_during_ms": p50_during,
        "ratio": p50_during / p50_idle,
    }


def table(results: dict) -> str:
    lines = [
        f"SAM {results['sam']}, {results['clicks']} clicks per column; a cold encode took "
        f"{results['encode_s_p50']:.2f} s (p50, alone on the server: {results['first_click_s']:.2f} s).",
        "",
        "| configuration | cached click p50, idle | p50 during cold encodes | ratio | p90 during | goal <= "
        f"{GOAL_RATIO:g}x |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, row in results["configs"].items():
        p90 = float(np.percentile(row["during_ms"], 90)) if row["during_ms"] else float("nan")
        lines.append(
            f"| {name} | {row['p50_idle_ms']:.0f} ms | {row['p50_during_ms']:.0f} ms | "
            f"{row['ratio']:.2f}x | {p90:.0f} ms | {'yes' if row['ratio'] <= GOAL_RATIO else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_encode", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sam", default="vit_b", help="SAM type of the encoder: vit_b (default), vit_h, or tiny"
    )
    parser.add_argument("--clicks", type=int, default=30, help="clicks measured per column")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="where checkpoints and graphs are kept"
    )
    parser.add_argument("--output", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="an exported small-checkpoint repository to start from (default: the benchmark's quick one, "
        "made when missing; the tests' .cache/tests/model_repository works too)",
    )
    args = parser.parse_args(argv)

    base = args.base or prepare("quick", "tiny", args.cache).repository
    sam_part = None if args.sam == "tiny" else sam_graphs(args.cache / "full", args.sam)
    workdir = args.cache / "cold-encode"
    workdir.mkdir(parents=True, exist_ok=True)
    output = args.output or (workdir if args.sam == "tiny" else DEFAULT_OUTPUT)
    results = {"sam": args.sam, "clicks": args.clicks, "configs": {}}
    for name, instances, nice in CONFIGS:
        repo = repository_for(base, sam_part, instances, nice, workdir)
        say(f"{name}: starting a server on {repo}")
        row = measure(repo, args.clicks, workdir / f"server-{instances}-{nice}.log")
        results["configs"][name] = row
        results["first_click_s"] = row["first_click_s"]
        say(
            f"{name}: cached click p50 {row['p50_idle_ms']:.0f} ms idle, "
            f"{row['p50_during_ms']:.0f} ms during cold "
            f"encodes ({row['ratio']:.2f}x; {len(row['during_ms'])} clicks, encodes {len(row['encode_s'])})"
        )
        shutil.rmtree(repo)
    results["encode_s_p50"] = statistics.median(s for r in results["configs"].values() for s in r["encode_s"])
    output.mkdir(parents=True, exist_ok=True)
    (output / "cold-encode.json").write_text(json.dumps(results, indent=1))
    text = "# Cached clicks during cold encodes (python -m bench.cold_encode)\n\n" + table(results)
    (output / "cold-encode.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
