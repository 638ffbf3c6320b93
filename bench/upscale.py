"""Real-ESRGAN upscale time and memory on CPU: ``python -m bench.upscale [--runs 3] [--quick]``.

What issue 14 asks to measure: how long the ``upscale`` step takes on a 512x512 and a 1920x1080 result at x4,
for RealESRGAN_x4plus (23 RRDBs) and RealESRGAN_x4plus_anime_6B (6 RRDBs), tiled as served against untiled,
and the memory each needs. The checkpoints are the official architectures at full size with random weights
(they cost the same to run as trained ones), written in the official format by ``export/make_esrgan.py`` and
exported by the project's own exporter (``isekai export esrgan``), once, into ``.cache/bench/upscale/``.

Per model and scene, each in a fresh process (so its peak RSS is its own), with onnxruntime set up as the
served ``upscale`` model is (its ``config.pbtxt`` parameters: all cores, no memory arena):

- **untiled** (the baseline, Real-ESRGAN's inference without ``--tile``): one run on the whole image. Where it
  would not fit, it is skipped, saying why: its memory is extrapolated by output pixels from the same model's
  untiled run on the smaller scene and compared with the memory available now;
- **tiled** as served: :func:`isekai.ensemble.upscale.upscale_image` with 512-pixel tiles and 10 of context
  (what the ``finish`` step runs, minus its BLS round trips). A scene that fits one tile is that same single
  call;
- **tiled at 256** on the 512x512 scene only: what tiling itself costs (the context is run twice) where the
  untiled run fits.

Every process warms its session up on one small image, then times ``--runs`` runs (median in the table).
Results go to ``bench/results/upscale.md`` and ``.json`` (what this code wrote; never edited by hand).
``--quick`` runs the same code on the demo's tiny RRDBNet, small scenes and small tiles, in seconds, and
writes under the cache. A full run takes tens of minutes on 2 cores: RealESRGAN_x4plus costs ~36 MFLOP per
input pixel (~75 TFLOP for a 1920x1080 result at x4).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.models import DEFAULT_CACHE, ROOT
from bench.timing import say
from isekai import constants as C

DEFAULT_OUTPUT = ROOT / "bench" / "results"
SCALE = 4  # every model measured here is x4: the requested factor is the graph's own, no resize
MODELS = {"x4plus": "RealESRGAN_x4plus", "x4plus_anime_6B": "RealESRGAN_x4plus_anime_6B"}
QUICK_MODEL = "tiny"
SCENES = ("512", "1080")
QUICK_SIDE_DIVISOR = {"512": 4, "1080": 8}  # --quick: 128x128 and 240x135
OVERHEAD_TILE = 256  # the 512x512 scene tiled this small too: the cost of tiling where untiled fits
QUICK_TILE, QUICK_OVERHEAD_TILE = 64, 32
# the warm-up image (kernel selection, first allocations); a multiple of every unshuffle factor
WARMUP_SIDE = 32
# an untiled run is tried only if its extrapolated peak is below this share of MemAvailable
MEMORY_MARGIN = 0.8


@dataclass(frozen=True)
class Case:
    """One process's measurement: ``model`` on ``scene`` in ``mode`` (``untiled`` or ``tile N``)."""

    model: str
    scene: str
    height: int
    width: int
    mode: str
    tile: int  # the whole image's long side for untiled: one tile, one call
    pad: int


# ------------------------------------------------------------------------------------------------------------
# Graphs and scenes.
# ------------------------------------------------------------------------------------------------------------
def graph(variant: str, cache: Path) -> Path:
    """``cache/upscale/<variant>.onnx``: a random-weight checkpoint in the official format, exported once
    (written aside and renamed after its parity check, so an interrupted export is never taken for a finished
    one)."""
    from isekai.export.esrgan import export_esrgan  # noqa: PLC0415
    from isekai.export.make_esrgan import make_esrgan_checkpoint  # noqa: PLC0415

    folder = cache / "upscale"
    path = folder / f"{variant}.onnx"
    if path.is_file():
        return path
    checkpoint = folder / f"{MODELS.get(variant, variant)}.pth"
    if not checkpoint.is_file():
        say(f"making a random-weight {variant} checkpoint {checkpoint} (once)")
        make_esrgan_checkpoint(checkpoint, variant=variant)
    partial = folder / f".{variant}.partial.onnx"
    say(f"exporting {checkpoint.name} with isekai export esrgan (once)")
    export_esrgan(checkpoint, output=partial)
    partial.rename(path)
    return path


def scene_pixels(name: str, quick: bool) -> np.ndarray:
    """The benchmark's scene (bench/scenes.py) as uint8 [H, W, 3], shrunk for --quick."""
    from PIL import Image  # noqa: PLC0415

    from bench.scenes import scenes  # noqa: PLC0415

    rgb = scenes([name])[0].rgb
    if not quick:
        return rgb
    height, width = (side // QUICK_SIDE_DIVISOR[name] for side in rgb.shape[:2])
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))


# ------------------------------------------------------------------------------------------------------------
# One measurement (in its own process: python -m bench.upscale --measure CASE.json).
# ------------------------------------------------------------------------------------------------------------
def _rss(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(graph_path: Path, image: np.ndarray, case: Case, runs: int) -> dict:
    """Seconds of ``runs`` upscales of ``image`` (uint8 [H, W, 3]) as ``case`` says, after one warm-up
    call."""
    import onnxruntime as ort  # noqa: PLC0415

    from bench.onnx_pipeline import config_parameters  # noqa: PLC0415
    from isekai.ensemble.upscale import upscale_image  # noqa: PLC0415
    from isekai.serving.ort_options import providers, session_options  # noqa: PLC0415

    params = config_parameters(ROOT / "model_repository", C.UPSCALE_MODEL)
    session = ort.InferenceSession(str(graph_path), session_options(params), providers=providers(params))
    calls = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return session.run([C.ESRGAN_OUT_UPSCALED], {C.ESRGAN_IN_IMAGE: x})[0]

    run(np.full((1, 3, WARMUP_SIDE, WARMUP_SIDE), 0.5, np.float32))
    loaded = _rss("VmRSS")
    seconds = []
    for _ in range(runs):
        calls.clear()
        started = time.perf_counter()
        out = upscale_image(image, run, SCALE, tile=case.tile, tile_pad=case.pad)
        seconds.append(time.perf_counter() - started)
        say(f"{case.model} {case.scene} {case.mode}: {seconds[-1]:.2f} s ({len(calls)} graph calls)")
    assert out.shape == (SCALE * image.shape[0], SCALE * image.shape[1], 3), out.shape
    return {"seconds": seconds, "calls": len(calls), "loaded_rss": loaded, "peak_rss": _rss("VmHWM")}


def _measure_main(case_path: Path) -> int:
    spec = json.loads(case_path.read_text())
    case = Case(**spec["case"])
    result = measure(Path(spec["graph"]), np.load(spec["image"]), case, spec["runs"])
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def run_case(case: Case, graph_path: Path, image_path: Path, runs: int, workdir: Path) -> dict:
    """:func:`measure` in a fresh interpreter; a process killed (out of memory) is reported, not raised."""
    stem = f"{case.model}-{case.scene}-{case.mode.replace(' ', '')}"
    spec_path, out_path = workdir / f"{stem}.case.json", workdir / f"{stem}.result.json"
    out_path.unlink(missing_ok=True)
    spec = {"case": asdict(case), "graph": str(graph_path), "image": str(image_path), "runs": runs,
            "out": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "bench.upscale", "--measure", str(spec_path)], cwd=ROOT)
    if done.returncode != 0 or not out_path.is_file():
        return {"failed": f"the measuring process exited with {done.returncode} (killed for memory if "
                          "negative)"}
    return json.loads(out_path.read_text())


# ------------------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------------------
def available_memory() -> int:
    """MemAvailable in bytes (what a new process can take without swapping or the OOM killer)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def untiled_estimate(previous: dict | None, pixels: int) -> int | None:
    """Peak RSS of an untiled run with ``pixels`` output pixels, extrapolated from a smaller untiled run (its
    working memory, peak minus loaded, grows with the output's pixels); None without one."""
    if not previous or "peak_rss" not in previous:
        return None
    working = previous["peak_rss"] - previous["loaded_rss"]
    return previous["loaded_rss"] + working * pixels // previous["out_pixels"]


def cases_for(model: str, scene: str, height: int, width: int, tile: int, overhead_tile: int) -> list[Case]:
    """Untiled, tiled as served (unless the scene fits one tile), and on the small scene tiled at
    ``overhead_tile``."""
    cases = [Case(model, scene, height, width, "untiled", max(height, width), 0)]
    if max(height, width) > tile:  # else the served tiling is the same single call as untiled
        cases.append(Case(model, scene, height, width, f"tile {tile}", tile, C.UPSCALE_TILE_PAD))
    if scene == SCENES[0]:
        cases.append(Case(model, scene, height, width, f"tile {overhead_tile}", overhead_tile,
                          C.UPSCALE_TILE_PAD))
    return cases


def run(args: argparse.Namespace) -> dict:
    variants = [QUICK_MODEL] if args.quick else args.models
    tile, overhead_tile = (QUICK_TILE, QUICK_OVERHEAD_TILE) if args.quick else (args.tile, OVERHEAD_TILE)
    workdir = args.cache / "upscale" / ("work-quick" if args.quick else "work")
    workdir.mkdir(parents=True, exist_ok=True)
    images = {}
    for scene in args.scenes:
        images[scene] = workdir / f"scene-{scene}.npy"
        np.save(images[scene], scene_pixels(scene, args.quick))
    rows = []
    for variant in variants:
        path = graph(variant, args.cache)
        previous_untiled = None
        for scene in sorted(args.scenes, key=lambda s: np.load(images[s], mmap_mode="r").size):
            height, width = np.load(images[scene], mmap_mode="r").shape[:2]
            out_pixels = SCALE * height * SCALE * width
            for case in cases_for(variant, scene, height, width, tile, overhead_tile):
                row = {**asdict(case), "label": MODELS.get(variant, f"{variant} (quick)"),
                       "out_pixels": out_pixels}
                estimate = untiled_estimate(previous_untiled, out_pixels) if case.mode == "untiled" else None
                available = available_memory()
                if estimate is not None and estimate > MEMORY_MARGIN * available:
                    row["skipped"] = (f"needs ~{estimate / 2**30:.0f} GiB (extrapolated from the untiled "
                                      f"{previous_untiled['scene_shape']} run), {available / 2**30:.0f} GiB "
                                      f"available")
                    say(f"{variant} {scene} untiled: skipped, {row['skipped']}")
                else:
                    say(f"{variant} {scene} {case.mode}: {args.runs} run(s) in a fresh process")
                    row.update(run_case(case, path, images[scene], args.runs, workdir))
                if case.mode == "untiled" and "peak_rss" in row:
                    previous_untiled = {**row, "scene_shape": f"{height}x{width}"}
                rows.append(row)
    return {"rows": rows, "quick": args.quick, "runs": args.runs, "tile": tile}


# ------------------------------------------------------------------------------------------------------------
# Tables.
# ------------------------------------------------------------------------------------------------------------
def _median(row: dict) -> float | None:
    return statistics.median(row["seconds"]) if row.get("seconds") else None


def table_rows(result: dict) -> list[dict]:
    """One row per case, with the ratio to the untiled run of the same model and scene where both ran."""
    out = []
    for row in result["rows"]:
        base = next((r for r in result["rows"] if r["model"] == row["model"] and r["scene"] == row["scene"]
                     and r["mode"] == "untiled"), None)
        seconds, base_s = _median(row), _median(base) if base else None
        out.append({
            "model": row["label"],
            "scene": f"{row['width']}x{row['height']} -> {SCALE * row['width']}x{SCALE * row['height']}",
            "mode": row["mode"],
            "calls": row.get("calls"),
            "median_s": seconds,
            "vs_untiled": seconds / base_s if seconds and base_s else None,
            "peak_rss": row.get("peak_rss"),
            "working_rss": row["peak_rss"] - row["loaded_rss"] if "peak_rss" in row else None,
            "note": row.get("skipped") or row.get("failed") or "",
        })
    return out


def markdown(result: dict, command: str) -> str:
    from bench.cli import _machine, _software  # noqa: PLC0415

    def gib(value: int | None) -> str:
        return "" if value is None else f"{value / 2**30:.2f} GiB"

    lines = [
        "# Real-ESRGAN upscale (x4) on CPU: tiled as served vs untiled",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {_machine()[0]}  ",
        f"Software: {_software()}  ",
        f"Runs: {result['runs']} per row after a warm-up call, median shown; each row in its own process. "
        f"Served tiling: tile {result['tile']}, context {C.UPSCALE_TILE_PAD}.",
        "",
        "| model | scene -> result | mode | graph calls | time | vs untiled | peak RSS | working memory | "
        "note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in table_rows(result):
        time_s = "" if r["median_s"] is None else f"{r['median_s']:.2f} s"
        ratio = "" if r["vs_untiled"] is None else f"{r['vs_untiled']:.2f}x"
        lines.append(f"| {r['model']} | {r['scene']} | {r['mode']} | {r['calls'] or ''} | {time_s} | {ratio} "
                     f"| {gib(r['peak_rss'])} | {gib(r['working_rss'])} | {r['note']} |")
    lines += [
        "",
        "Working memory is the peak RSS minus the RSS after the session's warm-up call: the activations of "
        "the largest call (one tile, or the whole image). A scene no larger than one served tile has no "
        f"separate tiled row: tiling at {result['tile']} is then the untiled call itself.",
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs per row after a warm-up call (default 3)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS),
                        help="which official architectures (default both)")
    parser.add_argument("--scenes", nargs="+", choices=SCENES, default=list(SCENES),
                        help="bench scenes: 512 (512x512) and 1080 (1920x1080) (default both)")
    parser.add_argument("--tile", type=int, default=None,
                        help="served tile side to measure (default UPSCALE_TILE)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the tiny RRDBNet, scenes at 1/4 and 1/8, tiles of 64 and 32, 1 run; "
                        "writes under the cache, not bench/results")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="cache folder; checkpoints and graphs go to <cache>/upscale")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for upscale.md/.json (default bench/results; --quick: <cache>/upscale)")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # one case, internal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upscale", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.measure is not None:
        return _measure_main(args.measure)
    if args.runs < 1:
        parser.error(f"--runs should be >= 1 but is {args.runs}")
    if args.quick:
        args.runs = 1
    args.tile = args.tile or C.UPSCALE_TILE
    result = run(args)
    output = args.output or (args.cache / "upscale" if args.quick else DEFAULT_OUTPUT)
    output.mkdir(parents=True, exist_ok=True)
    name = "upscale-quick" if args.quick else "upscale"
    text = markdown(result, " ".join(["python -m bench.upscale", *map(shlex.quote, argv)]))
    (output / f"{name}.md").write_text(text, encoding="utf-8")
    (output / f"{name}.json").write_text(json.dumps({**result, "table": table_rows(result)}, indent=2))
    print(text)
    say(f"written to {output / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
