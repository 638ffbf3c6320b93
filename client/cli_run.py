"""``isekai run photo.jpg --click X,Y ... --output out.png``: the whole swap from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from isekai import constants as C
from isekai.client.cli_common import add_prompt_arguments, fail, read_low_res, read_photo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_arguments(parser)
    parser.add_argument("--output", type=Path, required=True,
                        help="where to write the scene with the character")
    parser.add_argument("--mask", type=Path, help="also write the person mask (PNG) here")
    parser.add_argument("--background", type=Path, help="also write the scene without the person here")
    parser.add_argument("--character",
                        help="a registered character (default: the repository's default character)")
    parser.add_argument("--prompt", help="replace the character's prompt for this request")
    parser.add_argument("--seed", type=int,
                        help=f"noise seed; the same seed gives the same image (default {C.DEFAULT_SEED})")
    parser.add_argument(
        "--steps", type=int,
        help=f"scheduler steps (default: the exported scheduler's, {C.DEFAULT_STEPS} for DPM-Solver++, "
        f"{C.LCM_STEPS} after --lcm-lora; at most {C.MAX_STEPS})",
    )
    parser.add_argument("--strength", type=float,
                        help=f"how far to redraw the person, (0, 1] (default {C.DEFAULT_STRENGTH})")
    parser.add_argument(
        "--guidance", type=float,
        help=f"classifier-free guidance scale (default: the exported scheduler's, {C.DEFAULT_GUIDANCE:g} for "
        f"DPM-Solver++, {C.LCM_GUIDANCE:g} after --lcm-lora)",
    )
    parser.add_argument(
        "--upscale", type=int, choices=C.UPSCALE_FACTORS,
        help=f"make the result this many times the photo's size with the server's Real-ESRGAN "
        f"(default {C.DEFAULT_UPSCALE}: off); mask and background keep the photo's size",
    )
    parser.add_argument(
        "--format", choices=C.OUTPUT_FORMATS,
        help="encoding of result and background (default: from --output's suffix, else png)",
    )
    parser.add_argument(
        "--no-progress", action="store_true",
        help="call the plain isekai model (one unary gRPC call) instead of isekai_stream's progress bar",
    )


def _format_for(path: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    suffix = path.suffix.lower().lstrip(".")
    return (
        {"jpg": "jpeg"}.get(suffix, suffix) if suffix in ("jpg", "jpeg", "png", "webp") else C.DEFAULT_FORMAT
    )


class ProgressBar:
    """``[#########-----------]  45% diffusion`` on one terminal line (a line per stage when not a
    terminal)."""

    WIDTH = 30

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.stage = ""

    def update(self, stage: str, fraction: float) -> None:
        filled = int(round(self.WIDTH * min(max(fraction, 0.0), 1.0)))
        line = f"[{'#' * filled}{'-' * (self.WIDTH - filled)}] {fraction * 100:3.0f}% {stage}"
        if self.tty:
            self.stream.write(f"\r{line:<{self.WIDTH + 30}}")
        elif stage != self.stage:
            self.stream.write(line + "\n")
        self.stage = stage
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.stage:
            self.stream.write("\n")
            self.stream.flush()


def swap_with_progress(client, image: bytes, bar: ProgressBar, *args, **options):
    """``client.swap_stream`` drawn on ``bar``; returns the SwapResult. Ctrl-C cancels the swap on the
    server."""
    from isekai.client.client import SwapProgress  # noqa: PLC0415

    with client.swap_stream(image, *args, **options) as stream:
        try:
            for event in stream:
                if isinstance(event, SwapProgress):
                    bar.update(event.stage, event.progress)
                else:
                    bar.update(C.STREAM_STAGE_DONE, 1.0)
                    return event
        finally:
            bar.close()
    raise RuntimeError(f"{C.STREAM_MODEL} ended without a result")


def main(args: argparse.Namespace) -> int:
    from isekai.client.client import IsekaiClient  # noqa: PLC0415

    image = read_photo(args.photo)
    started = time.perf_counter()
    try:
        client = IsekaiClient(args.url, timeout_s=args.timeout)
        prompt = (args.click, args.negative, args.box)
        options = dict(
            mask_input=read_low_res(args.low_res_in), character=args.character, prompt=args.prompt,
            strength=args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed,
            format=_format_for(args.output, args.format), upscale=args.upscale,
        )
        if args.no_progress:
            out = client.swap(image, *prompt, **options)
        else:
            out = swap_with_progress(client, image, ProgressBar(), *prompt, **options)
    except KeyboardInterrupt:
        print("isekai: cancelled")
        return 130
    except Exception as err:  # noqa: BLE001 - server and input errors become one line
        return fail(err)
    args.output.write_bytes(out.result)
    written = [str(args.output)]
    for path, data in ((args.mask, out.mask), (args.background, out.background)):
        if path is not None:
            path.write_bytes(data)
            written.append(str(path))
    print(f"wrote {', '.join(written)} (mask score {out.score:.3f}, {time.perf_counter() - started:.2f}s)")
    return 0
