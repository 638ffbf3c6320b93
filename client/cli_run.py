"""``isekai run photo.jpg --click X,Y ... --output out.png``: the whole swap from the command line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from isekai import constants as C
from isekai.client.cli_common import add_prompt_arguments, fail, read_low_res, read_photo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_arguments(parser)
    parser.add_argument("--output", type=Path, required=True, help="where to write the scene with the character")
    parser.add_argument("--mask", type=Path, help="also write the person mask (PNG) here")
    parser.add_argument("--background", type=Path, help="also write the scene without the person here")
    parser.add_argument("--character", help="a registered character (default: the repository's default character)")
    parser.add_argument("--prompt", help="replace the character's prompt for this request")
    parser.add_argument("--seed", type=int, help=f"noise seed; the same seed gives the same image (default {C.DEFAULT_SEED})")
    parser.add_argument("--steps", type=int, help=f"scheduler steps (default {C.DEFAULT_STEPS}, at most {C.MAX_STEPS})")
    parser.add_argument("--strength", type=float, help=f"how far to redraw the person, (0, 1] (default {C.DEFAULT_STRENGTH})")
    parser.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (default {C.DEFAULT_GUIDANCE})")
    parser.add_argument(
        "--upscale", type=int, choices=C.UPSCALE_FACTORS,
        help=f"make the result this many times the photo's size with the server's Real-ESRGAN "
        f"(default {C.DEFAULT_UPSCALE}: off); mask and background keep the photo's size",
    )
    parser.add_argument(
        "--format", choices=C.OUTPUT_FORMATS,
        help="encoding of result and background (default: from --output's suffix, else png)",
    )


def _format_for(path: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "jpeg"}.get(suffix, suffix) if suffix in ("jpg", "jpeg", "png", "webp") else C.DEFAULT_FORMAT


def main(args: argparse.Namespace) -> int:
    from isekai.client.client import IsekaiClient  # noqa: PLC0415

    image = read_photo(args.photo)
    started = time.perf_counter()
    try:
        client = IsekaiClient(args.url, timeout_s=args.timeout)
        out = client.swap(
            image, args.click, args.negative, args.box, mask_input=read_low_res(args.low_res_in),
            character=args.character, prompt=args.prompt,
            strength=args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed,
            format=_format_for(args.output, args.format), upscale=args.upscale,
        )
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
