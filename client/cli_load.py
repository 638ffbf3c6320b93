"""``isekai load photo.jpg [...] --requests 200 --concurrency 4``: a bounded load run, counts and
latencies."""

from __future__ import annotations

import argparse
from pathlib import Path

from isekai import constants as C
from isekai.client.cli_common import parse_point, read_photo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", type=Path, nargs="+", help="photos to send (picked at random, so repeated)")
    parser.add_argument(
        "--click", type=parse_point, action="append", default=[], metavar="X,Y",
        help="clicks to pick from, in pixels inside every photo (repeatable; default: each photo's centre)",
    )
    parser.add_argument("--requests", type=int, default=200, help="requests to send at most")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    parser.add_argument("--swap-fraction", type=float, default=0.1,
                        help="share of whole swaps (isekai); the rest are masks (isekai_segment)")
    parser.add_argument("--steps", type=int, default=2, help="diffusion steps of the swaps")
    parser.add_argument("--seed", type=int, default=0, help="seeds the request schedule")
    parser.add_argument(
        "--url", default=f"localhost:{C.DEFAULT_GRPC_PORT}",
        help="server gRPC address; several comma-separated, or dns:///HOST:PORT, are used round-robin",
    )
    parser.add_argument(
        "--metrics-url", default=None, metavar="HOST:PORT",
        help="a server's metrics endpoint (e.g. localhost:8002): also print Triton's queue vs compute time "
        "per model over the run (from that one server)",
    )


def _centre(image: bytes) -> tuple[float, float]:
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    with Image.open(io.BytesIO(image)) as img:
        return img.width / 2, img.height / 2


def main(args: argparse.Namespace) -> int:
    from isekai.client.load import LoadMix, Photo, run_load  # noqa: PLC0415

    photos = []
    for path in args.photos:
        image = read_photo(path)
        photos.append(Photo(image, tuple(args.click) or (_centre(image),)))
    mix = LoadMix(tuple(photos), swap_fraction=args.swap_fraction, swap_options={"steps": args.steps},
                  seed=args.seed)
    if args.metrics_url:
        from isekai.client.stats import (  # noqa: PLC0415
            format_model_load,
            metrics_delta,
            model_metrics,
            settled_model_metrics,
        )

        before = model_metrics(args.metrics_url)
    report = run_load(args.url, args.requests, args.concurrency, args.duration, mix)
    print(report.table())
    if args.metrics_url:
        print("\nTriton's account of the run (metrics endpoint): queue vs compute time per model\n")
        print(format_model_load(metrics_delta(before, settled_model_metrics(args.metrics_url))))
    return 0 if report.ok else 1
