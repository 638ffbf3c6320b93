"""Seconds per DreamBooth-LoRA training step: ``python -m bench.train_step --size sd15 --steps 3``.

Makes a random-weight SD folder once under ``.cache/bench/train/<size>/`` (``sd15`` is the real SD 1.5
architecture: random weights cost the same to train as real ones) and reuses it afterwards. Then it builds
the trainer of :mod:`isekai.export.train_lora` on scikit-image's astronaut photo and times whole steps, each
what training repeats: draw the batch, VAE-encode it, the UNet forward and backward with LoRA, clip, AdamW.
The first step is timed on its own (warm-up: allocator, thread pool, lazy initialisation); the next
``--steps`` give min/median/max. The table goes to stdout and to ``bench/results/train-step-<size>.md``.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.models import DEFAULT_CACHE, ROOT
from bench.timing import say

DEFAULT_OUTPUT = ROOT / "bench" / "results"
PROMPT = "a photo of sks girl"


def sd_folder(size: str, cache: Path) -> Path:
    """``cache/train/<size>``, made by :func:`make_sd_folder` on the first run: written aside, then renamed,
    so an interrupted run never leaves a half folder that later runs would take for a whole one."""
    from isekai.export.make_sd import make_sd_folder  # noqa: PLC0415

    folder = cache / "train" / size
    if (folder / "model_index.json").is_file():
        return folder
    partial = folder.with_name(f".{size}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    say(f"making a random-weight {size} SD folder in {folder} (once)")
    make_sd_folder(partial, size=size)
    partial.rename(folder)
    return folder


def astronaut_photo(cache: Path) -> Path:
    """scikit-image's astronaut (512x512 RGB) as a PNG in ``cache/train/photos/``: the photo folder."""
    from PIL import Image  # noqa: PLC0415
    from skimage import data  # noqa: PLC0415

    folder = cache / "train" / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "astronaut.png"
    if not path.is_file():
        Image.fromarray(data.astronaut()).save(path)
    return folder


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Load, build the trainer, time 1 + ``args.steps`` steps; the numbers of the table."""
    import torch  # noqa: PLC0415

    # Imported before the load is timed: importing is not loading.
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: PLC0415, F401
    from peft import inject_adapter_in_model  # noqa: PLC0415, F401
    from transformers import CLIPTextModel  # noqa: PLC0415, F401

    from isekai.export import train_lora as tl  # noqa: PLC0415
    from isekai.export import train_photos as tp  # noqa: PLC0415
    from isekai.export.sd import load_sd  # noqa: PLC0415

    folder = sd_folder(args.size, args.cache)
    options = tl.TrainOptions(
        resolution=args.resolution, rank=args.rank, batch_size=args.batch_size, device=args.device, seed=0
    )
    photos = tp.load_photos(tp.list_photos(astronaut_photo(args.cache)), options.resolution)
    started = time.perf_counter()
    trainer = tl.LoraTrainer(load_sd(folder), PROMPT, options, photos)
    load_s = time.perf_counter() - started
    lora_params = sum(p.numel() for p in trainer.lora_parameters)

    def step(index: int) -> float:
        started = time.perf_counter()
        trainer.step(trainer.draw_batch(index))
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)  # CUDA runs asynchronously: wait for the step's kernels
        return time.perf_counter() - started

    say(f"warm-up step ({args.size}, {options.resolution}x{options.resolution}, batch {options.batch_size})")
    warmup_s = step(0)
    seconds = []
    for index in range(1, args.steps + 1):
        seconds.append(step(index))
        say(f"step {index}/{args.steps}: {seconds[-1]:.2f} s")
    return {
        "folder": folder,
        "options": options,
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "lora_params": lora_params,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "peak_rss": peak_rss_bytes(),
    }


def markdown(result: dict, args: argparse.Namespace, command: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    from bench.cli import _machine, _software  # noqa: PLC0415

    options, seconds = result["options"], result["seconds"]
    rows = [
        ("model", f"{args.size} (random weights, {_shown(result['folder'])})"),
        ("device", f"{result['device']}, {result['threads']} torch threads"),
        ("step", f"{options.resolution}x{options.resolution}, batch {options.batch_size}, float32"),
        (
            "LoRA",
            f"rank {options.rank} on the UNet's to_q/to_k/to_v/to_out.0: {result['lora_params']:,} params",
        ),
        ("load + add LoRA", f"{result['load_s']:.2f} s"),
        ("first step (warm-up)", f"{result['warmup_s']:.2f} s"),
        (
            f"s/step over {len(seconds)} steps (min / median / max)",
            f"{min(seconds):.2f} / {statistics.median(seconds):.2f} / {max(seconds):.2f}",
        ),
        ("peak RSS (whole process)", f"{result['peak_rss'] / 2**30:.2f} GiB"),
    ]
    lines = [
        f"# DreamBooth-LoRA training step: {args.size}",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {_machine()[0]}  ",
        f"Software: {_software()}, transformers {version('transformers')}, peft {version('peft')}",
        "",
        "| measure | value |",
        "| --- | ---: |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (results should not name a home folder)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        choices=("tiny", "sd15"),
        default="sd15",
        help="SD architecture (default sd15; tiny: smoke run)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up one (default 3)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--resolution", type=int, default=512, help="training side in pixels (default 512)")
    parser.add_argument("--batch-size", type=int, default=1, help="photos per step (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="cache folder; the SD folder goes to <cache>/train/<size>",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for train-step-<size>.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps should be >= 1 but is {args.steps}")
    result = measure(args)
    text = markdown(result, args, " ".join(["python -m bench.train_step", *map(shlex.quote, argv)]))
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"train-step-{args.size}.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    say(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
