"""``python -m bench`` (``make bench``): the configurations side by side, the goals, the levers.

One run, in this order, each phase in its own process (``bench/phase.py``) so only one copy of the models is
in memory at a time:

1. prepare: full-size random-weight checkpoints, exported once into ``.cache/bench`` (reused by later runs);
2. this machine's matmul peak (again at the end; the ratio uses the higher); 3. configuration 1a, the
seed-style PyTorch baseline (``bench/baseline.py``: LaMa on the whole scene, SAM again
   on the generated crop, as the original app);
4. configuration 1b, the same-work PyTorch baseline (the served pipeline's crops and silhouette, run by
torch); 5. configuration 2, the same ONNX graphs in-process with onnxruntime, LaMa beside the diffusion as
served
   (``bench/inprocess.py``);
6. configuration 3, the ``isekai`` ensemble on the embedded Triton over gRPC (``bench/served.py``), with the
   interactive-selection rows, unet dynamic batching and a load run;
7. configuration 4, the fast path: the ensemble served from a repository with MobileSAM (vit_t) and an
LCM-LoRA
   fused into SD (4 steps, guidance 1: the exported scheduler's defaults), swaps and clicks (skipped with a
   note when vit_t cannot be exported by this version);
8. the levers (``bench/levers.py``);

then ``bench/results/<profile>-<sam>.md`` and ``.json``, exactly as the code wrote them: every figure the
README's Performance section quotes is in them, labelled with the baseline it is measured against and the CPU
(AVX-512 or not) of the phase it came from. ``--quick`` does all of it on the small test checkpoints in a few
minutes (the smoke test runs it); the full run takes hours on 2 CPU cores. It never runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.models import DEFAULT_CACHE, ROOT
from bench.report import write
from bench.timing import say
from isekai import constants as C

DEFAULT_OUTPUT = ROOT / "bench" / "results"
PHASES = ("baseline", "same_work", "onnxruntime", "served", "fast", "levers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small test checkpoints, 1 run, 2 steps: a smoke check of every table in ~1 "
                             "minute")
    parser.add_argument("--sam", choices=("vit_h", "vit_b", "vit_l", "vit_t"), default="vit_h",
                        help="SAM architecture of the full run (default vit_h; vit_t: MobileSAM)")
    parser.add_argument("--runs", type=int, default=None, help="timed swaps per configuration and scene "
                        "(default 3; --quick 1); end-to-end is their median")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps (default {C.DEFAULT_STEPS}, the API default; --quick 2)")
    parser.add_argument("--strength", type=float, default=C.DEFAULT_STRENGTH, help="img2img strength")
    parser.add_argument("--guidance", type=float, default=C.DEFAULT_GUIDANCE,
                        help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=7, help="noise seed (the same in every configuration)")
    parser.add_argument("--scenes", default="512,1080",
                        help="scenes: 512 (astronaut 512x512), 1080 (1920x1080)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats of each lever measurement (default 3; --quick 1)")
    parser.add_argument("--load-requests", type=int, default=None,
                        help="isekai_segment requests per concurrency level of the load run (default 40; "
                             "--quick 8)")
    for phase in PHASES:
        parser.add_argument(f"--skip-{phase.replace('_', '-')}", action="store_true",
                            help=f"leave out the {phase} phase")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where checkpoints and exported graphs are made once and reused (default "
                             ".cache/bench)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the .md and .json go")
    parser.add_argument("--resume", action="store_true",
                        help="keep the phases the previous run (same settings) finished in the cache's work "
                        "folder, run the rest: after a crash or an interrupted run")
    parser.add_argument("--repository", type=Path, default=None,
                        help="use this exported repository instead of making one (needs --checkpoints)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="the checkpoints --repository was exported from (the baseline loads them)")
    parser.add_argument("--fast-repository", type=Path, default=None,
                        help="serve the fast path from this exported LCM repository (isekai export sd "
                        "--lcm-lora) instead of making one with MobileSAM")


def _machine() -> tuple[str, int]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    cores = os.cpu_count() or 1
    return (
        f"{model}, {cores} cores, {mem / 2**20:.0f} GiB RAM, {platform.system()} {platform.release()}",
        cores,
    )


def _software() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    names = ("torch", "onnxruntime", "diffusers", "nvidia-pytriton", "tritonclient")
    return f"Python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names)


def _gpu() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out:
        return f"{out} present, not used: this run measures the default (CPU) profile"
    return ("none on this machine, so the gpu/tensorrt profiles were not measured (issue 5's GPU anchors "
            "are open)")


def run_phase(name: str, cfg: dict, workdir: Path, loads: list[str], resume: bool = False) -> dict:
    """Run one phase in a fresh interpreter; its progress lines go straight to this terminal.

    With ``resume``, a result the previous run left for the same settings is reused instead."""
    config = workdir / f"{name}.config.json"
    out = workdir / f"{name}.result.json"
    if resume and out.exists() and config.exists():
        previous = {k: v for k, v in json.loads(config.read_text()).items() if k != "nonce"}
        if previous == {k: v for k, v in cfg.items() if k != "nonce"}:
            say(f"phase {name}: reusing {out}")
            loads.append(f"{name} reused from the previous run")
            return json.loads(out.read_text())
    config.write_text(json.dumps(cfg, indent=2))
    say(f"phase {name}: starting")
    start_load = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.phase", name, str(config), str(out)], cwd=ROOT, check=True)
    loads.append(f"{name} {start_load:.1f}/{os.getloadavg()[0]:.1f}")
    say(f"phase {name}: done in {time.perf_counter() - started:.0f} s")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    quick = args.quick
    profile = "quick" if quick else "full"
    sam = "tiny" if quick else args.sam
    runs = args.runs or (1 if quick else 3)
    steps = args.steps or (2 if quick else C.DEFAULT_STEPS)
    repeats = args.repeats or (1 if quick else 3)
    options = {"steps": steps, "strength": args.strength, "guidance": args.guidance, "seed": args.seed}
    # The warm-up swap runs every model once at the timed shapes, with few steps.
    warmup = {**options, "steps": 2, "strength": 1.0}
    # Two concurrent swaps (does unet batch their steps?) at a few steps: the point is the batching, not the
    # time.
    concurrent = options if quick else {**options, "steps": 4, "strength": 1.0}
    scenes = [s.strip() for s in args.scenes.split(",") if s.strip()]
    machine, cores = _machine()
    # phase configs and results, saved inputs, the server log
    workdir = args.cache.resolve() / profile / "work"
    if not args.resume:
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    cfg = {
        "profile": profile, "sam": sam, "cache": str(args.cache.resolve()),
        "repository": str(args.repository.resolve()) if args.repository else None,
        "checkpoints": str(args.checkpoints.resolve()) if args.checkpoints else None,
        "scenes": scenes, "options": options, "warmup_options": warmup, "runs": runs, "repeats": repeats,
        "served_options": options, "served_warmup_options": warmup,
        "concurrent_options": concurrent, "workdir": str(workdir),
        "output": str(args.output.resolve()), "nonce": uuid.uuid4().hex[:8], "skip_levers": args.skip_levers,
        "peak_size": 1024 if quick else 4096, "load_requests": args.load_requests or (8 if quick else 40),
        "load_concurrency": [1, 2, 4], "png_suffix": "-quick" if quick else "",
        # The fast path: its repository's scheduler (LCM) sets steps and guidance, so the swaps leave them
        # out.
        "fast_options": {"strength": args.strength, "seed": args.seed},
        "fast_warmup_options": {"strength": 1.0, "seed": args.seed},
        "fast": {"base_repository": str(args.repository.resolve()) if args.repository else None,
                 "checkpoints": str(args.checkpoints.resolve()) if args.checkpoints else None,
                 "repository": str(args.fast_repository.resolve()) if args.fast_repository else None},
    }
    command = "python -m bench " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    say(f"{command}: {profile} models, SAM {sam}, scenes {scenes}, {runs} run(s), {steps} steps at strength "
        f"{args.strength}; work files in {workdir}")
    loads: list[str] = []
    results: dict = {}
    prepared = run_phase("prepare", cfg, workdir, loads, args.resume)
    cfg["lama_fft_onnx"] = prepared.get("lama_fft_onnx")
    cfg["clicks"] = {name: entry["click"] for name, entry in prepared["clicks"].items()}
    peaks = [_peak(cfg)]
    if not args.skip_baseline:
        results["baseline"] = run_phase("baseline", cfg, workdir, loads, args.resume)
    if not args.skip_onnxruntime:
        results["onnxruntime"] = run_phase("onnxruntime", cfg, workdir, loads, args.resume)
    crop = _person_crop(results)
    cfg["latent"] = [crop[0] // C.SD_VAE_FACTOR, crop[1] // C.SD_VAE_FACTOR]
    if not args.skip_same_work:
        results["same_work"] = run_phase("same_work", cfg, workdir, loads, args.resume)
    if not args.skip_served:
        results["served"] = run_phase("served", cfg, workdir, loads, args.resume)
    if not args.skip_fast:
        results["fast"] = _fast_phase(cfg, workdir, loads, args, prepared)
    if not args.skip_levers:
        ort = results.get("onnxruntime", {}).get("scenes", {})
        cfg["dpm_s"] = {s: (v["stages_ms"].get("diffusion", 0) / 1e3 or None) for s, v in ort.items()}
        cfg["e2e_s"] = {s: v.get("e2e_p50_s") for s, v in ort.items()}
        results["levers"] = run_phase("levers", cfg, workdir, loads, args.resume)
    peaks.append(_peak(cfg))
    results["flops"] = _flops(cfg, results, peaks, scenes[0])
    results["meta"] = {
        "profile": profile, "models": _models_label(quick, sam), "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine, "cores": cores,
        "software": _software(),
        "settings": f"configurations 1a-3: {steps} steps (DPM-Solver++ multistep; img2img runs int(steps x "
                    f"strength) = {int(steps * args.strength)}), strength {args.strength}, guidance "
                    f"{args.guidance}; configuration 4: its LCM scheduler's defaults ({C.LCM_STEPS} steps: "
                    f"{int(C.LCM_STEPS * args.strength)} UNet calls of batch 1, guidance "
                    f"{C.LCM_GUIDANCE:g}), strength {args.strength}; seed {args.seed}, {runs} timed run(s) "
                    "per configuration and scene after one warm-up swap",
        "gpu": _gpu(), "load": ", ".join(loads), "scenes": [_scene_name(s) for s in scenes],
        "notes": _notes(results, prepared["clicks"]),
    }
    stem = f"{profile}-{sam}" if not quick else "quick"
    md, js = write(results, args.output, stem)
    say(f"wrote {md} and {js}")
    print(md.read_text())
    return 0


def _fast_phase(cfg: dict, workdir: Path, loads: list[str], args: argparse.Namespace, prepared: dict) -> dict:
    """Configuration 4, or the note that says why it was skipped (no MobileSAM in this version)."""
    from bench.models import fast_sam_available  # noqa: PLC0415

    if not cfg["fast"]["repository"]:
        why = fast_sam_available(cfg["profile"])
        if why is not None:
            say(f"phase fast: {why}")
            return {"skipped": why}
    if cfg["profile"] == "quick" and not cfg["fast"]["base_repository"]:
        cfg["fast"]["base_repository"] = prepared["repository"]
    return run_phase("fast", cfg, workdir, loads, args.resume)


def _peak(cfg: dict) -> dict[str, float]:
    from bench.flops import matmul_peak_gflops  # noqa: PLC0415

    say("matmul peak of this machine (onnxruntime, torch, numpy)")
    peak = matmul_peak_gflops(cfg["peak_size"])
    say("matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    return peak


def _scene_name(short: str) -> str:
    from bench.scenes import SCENES  # noqa: PLC0415

    return SCENES[short]().name


def _person_crop(results: dict) -> tuple[int, int]:
    """The first scene's person crop (H, W) from the onnxruntime phase, or SD's native square without it."""
    for entry in results.get("onnxruntime", {}).get("scenes", {}).values():
        return tuple(entry["person_crop"])
    return C.SD_NATIVE_SIZE, C.SD_NATIVE_SIZE


def _flops(cfg: dict, results: dict, peaks: list[dict[str, float]], scene: str) -> dict:
    """UNet FLOPs per step at the first scene's latent, and FLOP/s achieved per configuration vs the peak."""
    from bench.flops import unet_step_flops  # noqa: PLC0415
    from bench.models import Checkpoints  # noqa: PLC0415

    checkpoints = (
        Path(cfg["checkpoints"])
        if cfg.get("checkpoints")
        else Path(cfg["cache"]) / cfg["profile"] / "checkpoints"
    )
    sd = Checkpoints.in_folder(checkpoints, cfg["sam"]).sd
    latent = tuple(cfg["latent"])
    flops = unet_step_flops(sd, latent)
    peak = max(max(p.values()) for p in peaks)
    name = _scene_name(scene)
    achieved = {}
    for config in ("baseline", "onnxruntime", "served"):
        ms = results.get(config, {}).get("scenes", {}).get(name, {}).get("stages_ms", {}).get("unet_step")
        if ms:
            achieved[config] = flops / (ms / 1e3) / 1e9
    served = achieved.get("served")
    return {"step_flops": flops, "latent": list(latent), "peaks": peaks, "peak_gflops": peak,
            "peak_size": cfg["peak_size"], "scene": name,
            "achieved_gflops": achieved, "served_fraction": served / peak if served else None}


def _models_label(quick: bool, sam: str) -> str:
    if quick:
        return (
            "small test checkpoints (tiny SAM, small LaMa, tiny SD): smoke check only, timings mean nothing"
        )
    return f"random weights at full size: SAM {sam}, big-lama (ngf 64, 18 blocks), Stable Diffusion 1.5"


def _notes(results: dict, clicks: dict[str, dict]) -> list[str]:
    notes = []
    for name, entry in clicks.items():
        x, y = entry["click"]
        notes.append(f"{name}: the swaps click at {x:.0f},{y:.0f}, candidate {entry['tried']} of the clicks "
                     "tried on the person, where this random-weight SAM "
                     f"{'finds' if entry['found'] else 'does not find'} someone (most clicks give a speckled "
                     "mask that cleans away to nobody, and a click on nothing skips LaMa and the diffusion).")
    for name, entry in results.get("onnxruntime", {}).get("scenes", {}).items():
        notes.append(f"{name}: SAM's cleaned mask covers {100 * entry['mask_fraction']:.1f} % of the photo "
                     "(random weights: not the astronaut's shape), and the crops follow it: person crop "
                     f"{entry['person_crop'][0]}x{entry['person_crop'][1]} (diffused at that size), LaMa "
                     f"input {entry['lama_input'][0]}x{entry['lama_input'][1]}. Trained weights give other "
                     "crop sizes; the models' costs per pixel are the same.")
    return notes
