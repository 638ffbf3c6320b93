"""``isekai segment photo.jpg --click X,Y ... --output mask.png``: the person mask only (SAM)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from isekai.client.cli_common import add_prompt_arguments, fail, read_low_res, read_photo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_arguments(parser)
    parser.add_argument("--output", type=Path, required=True, help="where to write the mask (PNG)")
    parser.add_argument("--low-res-out", type=Path,
                        help="write this answer's low-resolution logits (.npy) here")


def main(args: argparse.Namespace) -> int:
    from isekai.client.client import IsekaiClient  # noqa: PLC0415

    image = read_photo(args.photo)
    previous = read_low_res(args.low_res_in)
    started = time.perf_counter()
    try:
        out = IsekaiClient(args.url, timeout_s=args.timeout).segment(
            image, args.click, args.negative, args.box, mask_input=previous
        )
    except Exception as err:  # noqa: BLE001 - server and input errors become one line
        return fail(err)
    args.output.write_bytes(out.mask)
    if args.low_res_out:
        np.save(args.low_res_out, out.low_res_mask)
    print(f"wrote {args.output} (score {out.score:.3f}, {time.perf_counter() - started:.2f}s)")
    return 0
