"""Tiled super-resolution as Real-ESRGAN's own inference does it, with the model passed in as a callable.

The model is ``upscale_fn(image f32 [1, 3, h, w] RGB in 0..1) -> f32 [1, 3, s*h, s*w]`` (the exported
``upscale`` graph through onnxruntime or a BLS call; numpy fakes in tests). Nothing here imports torch or
Triton.

Geometry contract (s = scale, m = :func:`input_multiple` (s): 1 for x4, 2 for x2, 4 for x1):

1. Even sides. Networks below x4 pixel-unshuffle their input by m, so they need H and W multiples of m. The
   image is padded at the bottom and right, by reflection, up to the next multiples of m (numpy's
   ``"reflect"``: the edge pixel is not repeated, ``a b c d | c b``, as Real-ESRGAN's
   ``F.pad(..., "reflect")``), and the output is cropped back to s*H x s*W. An odd-sized image at x2 gets one
   reflected row/column: it is input to the network beside the last real one (they share 2x2 unshuffle
   blocks), and its own output is cut off.
2. Tiles. The (padded) image is cut into ``tile`` x ``tile`` squares from the top-left, the last row and
   column smaller. Each square is run with up to ``tile_pad`` pixels of context on every side (clipped at the
   image's border), and only the output of the square itself (s*tile a side) is pasted: tiles join without
   seams wherever the network's receptive field fits in the context (Real-ESRGAN's does not quite: tiling is
   an approximation there, as in its own inference). An image no larger than one tile is run whole, exactly
   as without tiling. ``tile`` must be a multiple of m, and the context is rounded up to one (x1 with the
   default 10 gets 12), so every input the model sees has sides that are multiples of m and starts on the
   unshuffle grid of the whole image.
3. Pixels. :func:`upscale_image` maps uint8 v to v / 255 and back with clip to 0..1, x255, round half to even,
   as Real-ESRGAN writes 8-bit images.

Limits: the output may hold at most ``MAX_UPSCALED_PIXELS``; :func:`check_upscale_size` runs before any model
work and raises ValueError naming ``upscale``, the factor and the size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from isekai import constants as C

UpscaleFn = Callable[[np.ndarray], np.ndarray]
# scale -> the multiple the network's input sides must be (its pixel-unshuffle factor).
INPUT_MULTIPLE = {4: 1, 2: 2, 1: 4}
_CHANNELS = 3
_PIXEL_MAX = 255.0


def input_multiple(scale: int) -> int:
    """The multiple H and W must be for a Real-ESRGAN RRDBNet of this scale: 1 (x4), 2 (x2) or 4 (x1)."""
    if scale not in INPUT_MULTIPLE:
        raise ValueError(f"upscale: scale must be one of {sorted(INPUT_MULTIPLE)} but is {scale!r}")
    return INPUT_MULTIPLE[scale]


def check_upscale_size(
    height: int, width: int, scale: int, max_pixels: int = C.MAX_UPSCALED_PIXELS
) -> tuple[int, int]:
    """The upscaled (height, width) in pixels; ValueError if it holds more than ``max_pixels`` pixels."""
    input_multiple(scale)
    out_h, out_w = scale * height, scale * width
    if out_h * out_w > max_pixels:
        raise ValueError(
            f"upscale: x{scale} of a {height}x{width} (HxW) image would be {out_h}x{out_w} = {out_h * out_w} "
            f"pixels, more than the limit of {max_pixels} (MAX_UPSCALED_PIXELS)"
        )
    return out_h, out_w


@dataclass(frozen=True)
class Tile:
    """One tile, in input pixels (rows y, columns x; half-open ranges).

    ``y0:y1, x0:x1`` is the square the tile owns (its output is pasted); ``py0:py1, px0:px1`` is what the
    model sees: the square plus up to ``tile_pad`` of context on each side, inside the image.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    py0: int
    py1: int
    px0: int
    px1: int

    def model_input(self) -> tuple[slice, slice]:
        """(rows, columns) of the input image the model runs on."""
        return slice(self.py0, self.py1), slice(self.px0, self.px1)

    def pasted_from(self, scale: int) -> tuple[slice, slice]:
        """(rows, columns) of the model's output for this tile that belong to the owned square."""
        top, left = scale * (self.y0 - self.py0), scale * (self.x0 - self.px0)
        height, width = scale * (self.y1 - self.y0), scale * (self.x1 - self.x0)
        return slice(top, top + height), slice(left, left + width)

    def pasted_to(self, scale: int) -> tuple[slice, slice]:
        """(rows, columns) of the whole upscaled image where that part goes."""
        return slice(scale * self.y0, scale * self.y1), slice(scale * self.x0, scale * self.x1)


def plan_tiles(height: int, width: int, tile: int, tile_pad: int) -> list[Tile]:
    """The tiles of a ``height`` x ``width`` image, row by row from the top-left (module docstring, 2)."""
    if tile < 1 or tile_pad < 0:
        raise ValueError(f"upscale: need tile >= 1 and tile_pad >= 0 but got {tile=}, {tile_pad=}")
    tiles = []
    for y0 in range(0, height, tile):
        y1 = min(y0 + tile, height)
        for x0 in range(0, width, tile):
            x1 = min(x0 + tile, width)
            context = (max(y0 - tile_pad, 0), min(y1 + tile_pad, height),
                       max(x0 - tile_pad, 0), min(x1 + tile_pad, width))
            tiles.append(Tile(y0, y1, x0, x1, *context))
    return tiles


def _check_tiling(
    height: int, width: int, scale: int, *, tile: int, tile_pad: int, max_pixels: int
) -> tuple[tuple[int, int], int, int]:
    """((out_h, out_w), multiple, context) after the size limit and the tiling are checked.

    The tile must be a multiple of the unshuffle factor; the context is rounded up to one.
    """
    out_size = check_upscale_size(height, width, scale, max_pixels)
    multiple = input_multiple(scale)
    if tile < 1 or tile % multiple:
        raise ValueError(f"upscale: tile must be a positive multiple of {multiple} at x{scale} but is {tile}")
    if tile_pad < 0:
        raise ValueError(f"upscale: tile_pad must be >= 0 but is {tile_pad}")
    return out_size, multiple, -(-tile_pad // multiple) * multiple


def _pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """[1, 3, H, W] -> [1, 3, H', W'], H' and W' the next multiples, by reflection at the bottom and right."""
    height, width = image.shape[-2:]
    extra_h, extra_w = -height % multiple, -width % multiple
    if not (extra_h or extra_w):
        return image
    return np.pad(image, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)), mode="reflect")


def _run_tiles(
    image: np.ndarray,
    upscale_fn: UpscaleFn,
    scale: int,
    tiles: list[Tile],
    paste: Callable[[tuple[slice, slice], np.ndarray], None],
) -> None:
    """Run every tile of ``image`` (f32 [1, 3, H, W]) and hand its owned output part (f32 [1, 3, sh, sw]) to
    ``paste`` with where it goes. A wrong output shape is the model's fault: RuntimeError."""
    for tile in tiles:
        rows, cols = tile.model_input()
        piece = np.ascontiguousarray(image[:, :, rows, cols])
        out = np.asarray(upscale_fn(piece), dtype=np.float32)
        want = (1, _CHANNELS, scale * piece.shape[2], scale * piece.shape[3])
        if out.shape != want:
            raise RuntimeError(
                f"{C.UPSCALE_MODEL} model returned shape {out.shape} for a tile of shape {piece.shape}; "
                f"expected {want} at x{scale}"
            )
        out_rows, out_cols = tile.pasted_from(scale)
        paste(tile.pasted_to(scale), out[:, :, out_rows, out_cols])


def _check_float_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.float32 or image.ndim != 4 or (
        image.shape[:2] != (1, _CHANNELS) or 0 in image.shape
    ):
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"upscale: image must be float32 [1, 3, H, W] with H, W >= 1 but is {dtype} {shape}")


def upscale_tiled(
    image: np.ndarray,
    upscale_fn: UpscaleFn,
    scale: int,
    *,
    tile: int = C.UPSCALE_TILE,
    tile_pad: int = C.UPSCALE_TILE_PAD,
    max_pixels: int = C.MAX_UPSCALED_PIXELS,
) -> np.ndarray:
    """Upscale ``image`` (f32 [1, 3, H, W] RGB 0..1) by ``scale`` in tiles -> f32 [1, 3, sH, sW], unclamped.

    ``upscale_fn`` is the model (see the module docstring); it is called once per tile, never on more than
    (tile + 2 * context) pixels a side.
    """
    _check_float_image(image)
    (out_h, out_w), multiple, context = _check_tiling(
        *image.shape[2:], scale, tile=tile, tile_pad=tile_pad, max_pixels=max_pixels
    )
    padded = _pad_to_multiple(image, multiple)
    out = np.empty((1, _CHANNELS, scale * padded.shape[2], scale * padded.shape[3]), dtype=np.float32)

    def paste(where: tuple[slice, slice], values: np.ndarray) -> None:
        out[:, :, where[0], where[1]] = values

    _run_tiles(padded, upscale_fn, scale, plan_tiles(*padded.shape[2:], tile, context), paste)
    return out if out.shape[2:] == (out_h, out_w) else np.ascontiguousarray(out[:, :, :out_h, :out_w])


def to_uint8(values: np.ndarray) -> np.ndarray:
    """f32 ~0..1 (any shape) -> uint8: clip to 0..1, x255, round half to even (Real-ESRGAN's 8-bit output)."""
    return np.rint(np.clip(values, 0.0, 1.0) * _PIXEL_MAX).astype(np.uint8)


def upscale_image(
    image: np.ndarray,
    upscale_fn: UpscaleFn,
    scale: int,
    *,
    tile: int = C.UPSCALE_TILE,
    tile_pad: int = C.UPSCALE_TILE_PAD,
    max_pixels: int = C.MAX_UPSCALED_PIXELS,
) -> np.ndarray:
    """Upscale an 8-bit RGB image: uint8 [H, W, 3] -> uint8 [sH, sW, 3] (see the module docstring).

    Each tile's output is converted to uint8 as it is pasted, so the float image is never held whole (an
    8192x8192 float32 RGB image is 768 MiB).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or (
        image.shape[2] != _CHANNELS or 0 in image.shape
    ):
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"upscale: image must be uint8 [H, W, 3] RGB with H, W >= 1 but is {dtype} {shape}")
    (out_h, out_w), multiple, context = _check_tiling(
        *image.shape[:2], scale, tile=tile, tile_pad=tile_pad, max_pixels=max_pixels
    )
    chw = image.astype(np.float32).transpose(2, 0, 1)[None] / _PIXEL_MAX  # [1, 3, H, W] in 0..1
    padded = _pad_to_multiple(chw, multiple)
    out = np.empty((scale * padded.shape[2], scale * padded.shape[3], _CHANNELS), dtype=np.uint8)

    def paste(where: tuple[slice, slice], values: np.ndarray) -> None:
        out[where[0], where[1]] = to_uint8(values[0].transpose(1, 2, 0))

    _run_tiles(padded, upscale_fn, scale, plan_tiles(*padded.shape[2:], tile, context), paste)
    return out if out.shape[:2] == (out_h, out_w) else np.ascontiguousarray(out[:out_h, :out_w])
