"""Flags shared by ``isekai run`` and ``isekai segment``: the photo, the clicks, the server."""

from __future__ import annotations

import argparse
from pathlib import Path

from isekai import constants as C


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in pixels, got {text!r}") from None
    return x, y


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 in pixels, got {text!r}") from None
    return x0, y0, x1, y1


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photo", type=Path, help="the photo (PNG, JPEG or WebP)")
    parser.add_argument(
        "--click", type=parse_point, action="append", default=[], metavar="X,Y",
        help="a click on the person, in original pixels (repeatable)",
    )
    parser.add_argument(
        "--negative", type=parse_point, action="append", default=[], metavar="X,Y",
        help="a click on something that is not the person (repeatable)",
    )
    parser.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1", help="a box around the person")
    parser.add_argument(
        "--low-res-in", type=Path,
        help="low-resolution logits (.npy, float32 [1,1,256,256]) of an earlier `isekai segment` answer to "
             "refine (the same clicks and --low-res-in give the same mask in `segment` and `run`)",
    )
    parser.add_argument(
        "--url", default=f"localhost:{C.DEFAULT_GRPC_PORT}",
        help="server gRPC address; several comma-separated, or dns:///HOST:PORT, are used round-robin",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")


def read_low_res(path: Path | None):
    """The ``--low-res-in`` array, or None."""
    if path is None:
        return None
    import numpy as np  # noqa: PLC0415

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SystemExit(f"isekai: cannot read --low-res-in {path}: {err}") from None


def read_photo(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SystemExit(f"isekai: cannot read the photo {path}: {err.strerror}") from None


def fail(err: Exception) -> int:
    """Print a server or input error as one line (no traceback) and return the exit code."""
    message = getattr(err, "message", lambda: None)() or str(err)
    print(f"isekai: {message}")
    return 1
