"""The served pipeline's memory (issue 15, item 4): tritonserver and every stub, one configuration per server.

    python -m bench.server_memory           # full size (SAM vit_h, big-lama, SD 1.5): ~10 min after export
    python -m bench.server_memory --quick   # the test checkpoints: a smoke check, figures mean nothing

Each configuration starts the embedded Triton on the benchmark's repository (``bench.models``), waits until
it is ready, then runs one cold swap of the 512x512 scene at the click the benchmark found; the memory
sampler of ``bench.served`` (every process's anonymous memory, half of the shared tensor memory, the largest
set of shared libraries) runs throughout, and each process's own anonymous peak is kept too, so the table
says which model holds what. The configurations differ in one thing each, in this order:

- **UNet attention, every head at once**: the UNet exported as diffusers runs its attention
  (``isekai export sd --attention-slicing none``), glibc's own malloc settings: the server before this issue's
  memory work;
- **UNet attention one head at a time** (the export's default, ``export/sd_attention.py``);
- the same **with glibc's mmap threshold fixed** (``ServerOptions.malloc_mmap_threshold``, the served default:
  buffers above it go back to the kernel when onnxruntime frees them, instead of staying in malloc's heap).

Memory does not depend on the number of steps (each UNet call frees its buffers), so the swap runs
``--steps`` (default 8: 6 UNet calls at strength 0.75) to keep the run short. Writes
``bench/results/server-memory-<sam>.md`` and ``.json`` as the code wrote them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.encoder_run import describe_machine, machine
from bench.models import DEFAULT_CACHE, prepare, unet_variant_repository
from bench.onnx_pipeline import person_clicks
from bench.scenes import astronaut, with_click
from bench.served import MemorySampler, Served, rss_parts, stage_ms
from bench.timing import say, write_results
from isekai import constants as C

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Configuration:
    name: str
    attention_slicing: str  # the UNet export's (isekai export sd --attention-slicing)
    malloc_mmap_threshold: int | None  # None: glibc's dynamic default


CONFIGURATIONS = (
    Configuration("before: UNet attention every head at once, glibc's malloc defaults", "none", None),
    Configuration("UNet attention one head at a time, glibc's malloc defaults", C.SD_ATTENTION_SLICING, None),
    Configuration(
        f"UNet attention one head at a time + malloc mmap threshold {C.MALLOC_MMAP_THRESHOLD // 1024} KiB "
        "(served default)",
        C.SD_ATTENTION_SLICING, C.MALLOC_MMAP_THRESHOLD,
    ),
)
# The server's peak against the bytes of its weights: issue 15's goal.
PEAK_GOAL = 1.3


class ModelMemorySampler(MemorySampler):
    """:class:`bench.served.MemorySampler` that also keeps each process's own anonymous peak."""

    def __init__(self, server_pid: int, interval_s: float = 0.5) -> None:
        super().__init__(server_pid, interval_s)
        self.anon_peaks: dict[int, int] = {}

    def total(self) -> int:
        for pid in self.pids:
            try:
                anon = rss_parts(pid)[0]
            except OSError:
                continue
            self.anon_peaks[pid] = max(self.anon_peaks.get(pid, 0), anon)
        return super().total()


def _process_names(server_pid: int) -> dict[int, str]:
    """pid -> the model its stub serves (``tritonserver`` for the server itself)."""
    from isekai.serving.stubs import server_stubs  # noqa: PLC0415

    return {server_pid: "tritonserver"} | {s.pid: s.model for s in server_stubs(server_pid) if not s.zombie}


def measure(config: Configuration, repository: Path, scene, options: dict, log: Path, nonce: str) -> dict:
    from isekai.serving.server import ServerOptions, TritonServer, free_port  # noqa: PLC0415

    opts = ServerOptions(repository=repository, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port(), malloc_mmap_threshold=config.malloc_mmap_threshold)
    say(f"server memory: {config.name}: starting the embedded Triton on {repository}")
    with TritonServer(opts, log_path=log) as server:
        pid = server.process.pid
        names = _process_names(pid)
        sampler = ModelMemorySampler(pid)
        loaded = sampler.total()
        sampler.start()
        served = Served(server)
        try:
            image = scene.png(f"{nonce}-{config.attention_slicing}-{config.malloc_mmap_threshold}")
            seconds, delta, _ = served.timed(served.client.swap, image, [scene.click], **options)
            held = sampler.total()
        finally:
            peak = max(sampler.stop(), loaded)
            served.close()
    per_model: dict[str, int] = {}
    for p, anon in sampler.anon_peaks.items():
        name = names.get(p, "?")
        per_model[name] = per_model.get(name, 0) + anon
    result = {
        "name": config.name, "attention_slicing": config.attention_slicing,
        "malloc_mmap_threshold": config.malloc_mmap_threshold, "processes": len(sampler.pids),
        "loaded_bytes": loaded, "peak_bytes": peak, "held_bytes": held, "swap_s": seconds,
        "unet_steps": delta[C.UNET_MODEL].inferences, "stages_ms": stage_ms(delta),
        "anon_peak_bytes": dict(sorted(per_model.items(), key=lambda kv: -kv[1])),
    }
    say(f"server memory: {config.name}: loaded {loaded / GIB:.2f} GiB, peak {peak / GIB:.2f} GiB, held "
        f"{held / GIB:.2f} GiB after the swap ({seconds:.1f} s)")
    return result


def report(result: dict) -> str:
    weights = result["weight_bytes"]
    rows = result["configurations"]
    base = rows[0]
    lines = [
        f"# Server memory: {result['models']} (issue 15, item 4)",
        "",
        f"`{result['command']}` on {describe_machine(result['machine'])}. Each row: the embedded Triton "
        f"started on the repository, then one cold swap of the {result['scene']} scene "
        f"({result['options']}); memory sampled every 0.5 s over tritonserver and its "
        f"{rows[0]['processes'] - 1} Python-backend stubs (anonymous memory of each, half of the shared "
        "tensor memory, the largest set of shared libraries). Weights: the exported graphs' bytes, "
        f"{weights / GIB:.2f} GiB.",
        "",
        "| configuration | loaded | peak | held after the swap | peak / weights | peak vs first row | swap "
        "| one UNet step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        step = r["stages_ms"].get("unet_step")
        lines.append(
            f"| {r['name']} | {r['loaded_bytes'] / GIB:.2f} GiB | {r['peak_bytes'] / GIB:.2f} GiB "
            f"| {r['held_bytes'] / GIB:.2f} GiB | {r['peak_bytes'] / weights:.2f}x "
            f"| {100 * (r['peak_bytes'] / base['peak_bytes'] - 1):+.0f} % | {r['swap_s']:.1f} s "
            f"| {f'{step / 1e3:.2f} s' if step is not None else '—'} |"
        )
    models = list(rows[0]["anon_peak_bytes"])
    lines += [
        "",
        "Each process's own peak of anonymous memory (MiB; the processes peak at different moments, so the "
        "column sums are above the server's peak):",
        "",
        "| process | " + " | ".join(r["name"] for r in rows) + " |",
        "| --- | " + " | ".join("---:" for _ in rows) + " |",
    ]
    for name in models:
        cells = " | ".join(f"{r['anon_peak_bytes'].get(name, 0) / MIB:.0f}" for r in rows)
        lines.append(f"| {name} | {cells} |")
    served = rows[-1]
    ratio = served["peak_bytes"] / weights
    torch_stubs = sum(served["anon_peak_bytes"].get(m, 0) for m in (C.DIFFUSION_MODEL, C.STREAM_MODEL))
    loads = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in result["loadavg"])
    lines += [
        "",
        f"Goal: the served default's peak <= {PEAK_GOAL}x its weights: {ratio:.2f}x, "
        f"{'met' if ratio <= PEAK_GOAL else '**missed**'}. Loaded and idle, the server already holds "
        f"{(served['loaded_bytes'] - weights) / GIB:.2f} GiB above its weights (each stub's interpreter; the "
        f"three that import torch for diffusers' schedulers, diffusion's two instances and isekai_stream, "
        f"{torch_stubs / GIB:.2f} GiB of it), and the SAM encoder's run adds its activations on top.",
        "",
        f"1-minute load average at each row's start/end: {loads} on {result['machine']['cores']} cores "
        "(above the core count, other work shared the CPUs: times are then upper bounds; memory is not "
        "affected).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam", default="vit_h", help="SAM architecture of the full run (default vit_h)")
    parser.add_argument("--steps", type=int, default=8, help="the swap's steps (default 8; memory does not "
                        "depend on them)")
    parser.add_argument("--quick", action="store_true", help="the test checkpoints: a smoke check")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="the benchmark cache (default .cache/bench)"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the .md/.json go (default bench/results)"
    )
    parser.add_argument("--repository", type=Path, default=None,
                        help="an exported repository to use (with --checkpoints, what it was exported from)")
    parser.add_argument("--checkpoints", type=Path, default=None, help="the checkpoints of --repository")
    args = parser.parse_args(argv)
    profile = "quick" if args.quick else "full"
    models = prepare(profile, "tiny" if args.quick else args.sam, args.cache, repository=args.repository,
                     checkpoints=args.checkpoints)
    log_dir = args.cache / profile / "work"
    log_dir.mkdir(parents=True, exist_ok=True)
    scene = astronaut()
    clicks_file = args.cache / profile / f"clicks-{models.sam_type}.json"
    clicks = person_clicks(models.repository, [scene], clicks_file)
    scene = with_click(scene, clicks[scene.name]["click"])
    options = {"steps": args.steps, "strength": C.DEFAULT_STRENGTH, "guidance": C.DEFAULT_GUIDANCE,
               "seed": C.DEFAULT_SEED}
    nonce = f"{time.time_ns():x}"
    rows, loads, repositories = [], [], []
    for config in CONFIGURATIONS:
        repository = unet_variant_repository(models, args.cache, config.attention_slicing)
        repositories.append(str(repository))
        before = os.getloadavg()[0]
        rows.append(measure(config, repository, scene, options, log_dir / "tritonserver-memory.log", nonce))
        loads.append((before, os.getloadavg()[0]))
    result = {
        "command": " ".join(["python -m bench.server_memory", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "models": "the test checkpoints" if args.quick else
        f"SAM {models.sam_type}, big-lama, Stable Diffusion 1.5 at full size (random weights)",
        "scene": scene.name, "options": options, "weight_bytes": models.weight_bytes(),
        "configurations": rows, "loadavg": loads, "repositories": repositories,
    }
    stem = f"server-memory-{models.sam_type}"
    write_results(args.results, stem, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
