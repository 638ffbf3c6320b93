"""Crops of the scene for LaMa and Stable Diffusion, and pasting their outputs back.

A crop is described by :class:`CropGeometry`: a box in scene pixels, the size that box is resized to (the
"work" size), and the padded size the model sees (bottom/right padding up to a multiple). Everything that
moves pixels or coordinates between the scene and a crop goes through it, so the adapters never recompute a
scale or an offset, and it travels between Triton stages as an int64 ``[8]`` tensor (:meth:`to_array`).

Coordinates are continuous pixel edges: scene pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``; box
``(x0, y0, x1, y1)`` covers columns ``x0..x1-1`` and rows ``y0..y1-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from isekai import constants as C
from isekai.ensemble import masks as M

BoxXYXY = tuple[int, int, int, int]


@dataclass(frozen=True)
class CropGeometry:
    """Scene box ``(x0, y0, x1, y1)`` -> resized to ``(work_h, work_w)`` -> padded to ``(out_h, out_w)``."""

    x0: int
    y0: int
    x1: int
    y1: int
    work_h: int
    work_w: int
    out_h: int
    out_w: int

    ARRAY_LEN = 8  # length of to_array()

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 >= 0 and self.y1 > self.y0 >= 0):
            raise ValueError(f"crop box must satisfy 0 <= x0 < x1 and 0 <= y0 < y1 but is {self.box}")
        if not (0 < self.work_h <= self.out_h and 0 < self.work_w <= self.out_w):
            raise ValueError(f"crop sizes must satisfy 0 < work <= out but are work=({self.work_h}, "
                             f"{self.work_w}) out=({self.out_h}, {self.out_w})")

    # -- construction and serialization ----------------------------------------------------------------------
    @classmethod
    def plan(
        cls, box: BoxXYXY, *, long_side: int, multiple: int, upscale: bool, min_side: int = 1
    ) -> CropGeometry:
        """Geometry for a scene ``box`` resized so its long side is ``long_side`` (never enlarged unless
        ``upscale``), each side rounded to the nearest pixel, then padded up to a multiple of ``multiple`` and
        to at least ``min_side`` (a model's smallest input side: a thin photo's crop is padded, not
        stretched)."""
        x0, y0, x1, y1 = (int(v) for v in box)
        bh, bw = y1 - y0, x1 - x0
        if bh <= 0 or bw <= 0:
            raise ValueError(f"crop box must have positive size but is {tuple(box)}")
        scale = long_side / max(bh, bw)
        if not upscale:
            scale = min(scale, 1.0)
        work_h, work_w = max(1, _round(bh * scale)), max(1, _round(bw * scale))
        out_h, out_w = (_ceil_to(max(side, min_side), multiple) for side in (work_h, work_w))
        return cls(x0, y0, x1, y1, work_h, work_w, out_h, out_w)

    def to_array(self) -> np.ndarray:
        """int64 ``[8]``: ``x0, y0, x1, y1, work_h, work_w, out_h, out_w``."""
        return np.array([self.x0, self.y0, self.x1, self.y1, self.work_h, self.work_w, self.out_h,
                         self.out_w], dtype=np.int64)

    @classmethod
    def from_array(cls, array: np.ndarray) -> CropGeometry:
        """Inverse of :meth:`to_array` (accepts any integer-valued array of 8 elements, e.g. ``[1, 8]``)."""
        arr = np.asarray(array).reshape(-1)
        if arr.size != cls.ARRAY_LEN or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"crop geometry must be {cls.ARRAY_LEN} integers but is {arr.tolist()}")
        return cls(*(int(v) for v in arr))

    # -- derived sizes ---------------------------------------------------------------------------------------
    @property
    def box(self) -> BoxXYXY:
        return self.x0, self.y0, self.x1, self.y1

    @property
    def box_h(self) -> int:
        return self.y1 - self.y0

    @property
    def box_w(self) -> int:
        return self.x1 - self.x0

    @property
    def scale_x(self) -> float:
        """Crop pixels per scene pixel along x."""
        return self.work_w / self.box_w

    @property
    def scale_y(self) -> float:
        """Crop pixels per scene pixel along y."""
        return self.work_h / self.box_h

    # -- coordinates -----------------------------------------------------------------------------------------
    def to_crop(self, xy: np.ndarray) -> np.ndarray:
        """``[..., 2]`` scene ``(x, y)`` -> crop ``(x, y)`` (float64)."""
        out = np.array(xy, dtype=np.float64, copy=True)
        out[..., 0] = (out[..., 0] - self.x0) * self.scale_x
        out[..., 1] = (out[..., 1] - self.y0) * self.scale_y
        return out

    def to_scene(self, xy: np.ndarray) -> np.ndarray:
        """``[..., 2]`` crop ``(x, y)`` -> scene ``(x, y)`` (float64); inverse of :meth:`to_crop`."""
        out = np.array(xy, dtype=np.float64, copy=True)
        out[..., 0] = out[..., 0] / self.scale_x + self.x0
        out[..., 1] = out[..., 1] / self.scale_y + self.y0
        return out

    # -- pixels ----------------------------------------------------------------------------------------------
    def extract(self, image: np.ndarray) -> np.ndarray:
        """Cut the box from ``image`` ``[H, W]`` or ``[H, W, C]`` (uint8 or float32), resize it to the work
        size (area averaging when shrinking, bilinear when enlarging), and pad bottom/right to
        ``(out_h, out_w)`` by mirroring (the model sees plausible content there, and :meth:`restore` drops
        it)."""
        img = np.asarray(image)
        if self.y1 > img.shape[0] or self.x1 > img.shape[1]:
            raise ValueError(f"crop box {self.box} does not fit an image of shape {img.shape}")
        patch = _resize(img[self.y0:self.y1, self.x0:self.x1], self.work_h, self.work_w)
        pad = [(0, self.out_h - self.work_h), (0, self.out_w - self.work_w)] + [(0, 0)] * (patch.ndim - 2)
        return np.pad(patch, pad, mode="symmetric")

    def extract_mask(self, mask: np.ndarray) -> np.ndarray:
        """Cut a bool ``[H, W]`` mask like :meth:`extract`, conservatively: a crop pixel is True if any scene
        pixel under it is (area average > 0). Padding is False. Returns bool ``[out_h, out_w]``."""
        m = M.as_2d(mask).astype(bool)
        if self.y1 > m.shape[0] or self.x1 > m.shape[1]:
            raise ValueError(f"crop box {self.box} does not fit a mask of shape {m.shape}")
        part = _resize(m[self.y0:self.y1, self.x0:self.x1].astype(np.float32), self.work_h, self.work_w)
        out = np.zeros((self.out_h, self.out_w), dtype=bool)
        out[: self.work_h, : self.work_w] = part > 0
        return out

    def restore(self, patch: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`extract`: ``[out_h, out_w(, C)]`` -> ``[box_h, box_w(, C)]`` (padding dropped),
        same dtype."""
        arr = np.asarray(patch)
        if arr.shape[:2] != (self.out_h, self.out_w):
            raise ValueError(f"patch must be [{self.out_h}, {self.out_w}, ...] for this crop but has shape "
                             f"{arr.shape}")
        return _resize(arr[: self.work_h, : self.work_w], self.box_h, self.box_w)


def expand_box(box: BoxXYXY, margin: int, image_size: tuple[int, int]) -> BoxXYXY:
    """Grow ``box`` by ``margin`` pixels on every side, then shift it back inside the ``(H, W)`` image
    (keeping its size where the image allows, as IOPaint's crop does), then clip."""
    x0, y0, x1, y1 = box
    h, w = image_size
    x0, x1 = _fit_span(x0 - margin, x1 + margin, w)
    y0, y1 = _fit_span(y0 - margin, y1 + margin, h)
    return x0, y0, x1, y1


def widen_box(box: BoxXYXY, min_aspect: float, image_size: tuple[int, int]) -> BoxXYXY:
    """Grow the short side of ``box`` (centred) until short/long >= ``min_aspect``, within the ``(H, W)``
    image."""
    x0, y0, x1, y1 = box
    h, w = image_size
    bw, bh = x1 - x0, y1 - y0
    if bw < min_aspect * bh:
        grow = math.ceil(min_aspect * bh) - bw
        x0, x1 = _fit_span(x0 - grow // 2, x1 + grow - grow // 2, w)
    elif bh < min_aspect * bw:
        grow = math.ceil(min_aspect * bw) - bh
        y0, y1 = _fit_span(y0 - grow // 2, y1 + grow - grow // 2, h)
    return x0, y0, x1, y1


def lama_margin(box: BoxXYXY) -> int:
    """Default context margin (pixels) around a LaMa hole's ``box``."""
    return max(C.LAMA_CROP_MARGIN_PX,
               _round(C.LAMA_CROP_MARGIN_FRACTION * max(box[2] - box[0], box[3] - box[1])))


def person_margin(box: BoxXYXY) -> int:
    """Default margin (pixels) around the person's ``box`` in the img2img crop."""
    long = max(box[2] - box[0], box[3] - box[1])
    return max(C.PERSON_CROP_MARGIN_MIN_PX, _round(C.PERSON_CROP_MARGIN_FRACTION * long))


def lama_crop(
    image: np.ndarray,
    hole: np.ndarray,
    *,
    margin: int | None = None,
    working_size: int = C.LAMA_WORKING_SIZE,
    multiple: int = C.LAMA_MODULO,
) -> tuple[np.ndarray, np.ndarray, CropGeometry]:
    """LaMa's inputs around the hole.

    Args:
        image: uint8 ``[H, W, 3]`` RGB scene.
        hole: bool ``[H, W]`` pixels to fill (the dilated person mask); must not be empty.
        margin: context pixels around the hole's box; default :func:`lama_margin`.
        working_size: the crop is shrunk (never enlarged) so its long side is at most this.
        multiple: the padded sides are multiples of this (LaMa's ``LAMA_MODULO``), and at least
            ``LAMA_MIN_SIDE``.

    Returns:
        ``image`` float32 ``[1, 3, h, w]`` in 0..1, ``mask`` float32 ``[1, 1, h, w]`` (1 = hole, a superset of
        the scaled hole, 0 in the padding), and the geometry to paste the result back.
    """
    box = M.bounding_box(hole)
    if box is None:
        raise ValueError("hole is empty: there is nothing for LaMa to fill")
    crop_box = expand_box(box, lama_margin(box) if margin is None else int(margin), image.shape[:2])
    geometry = CropGeometry.plan(crop_box, long_side=working_size, multiple=multiple, upscale=False,
                                 min_side=C.LAMA_MIN_SIDE)
    return (*lama_inputs(image, hole, geometry), geometry)


def lama_inputs(image: np.ndarray, hole: np.ndarray, geometry: CropGeometry) -> tuple[np.ndarray, np.ndarray]:
    """``(image f32 [1, 3, h, w] in 0..1, mask f32 [1, 1, h, w])`` for a given geometry (see
    :func:`lama_crop`)."""
    pixels = geometry.extract(_check_rgb(image)).astype(np.float32) / 255.0
    mask = geometry.extract_mask(hole).astype(np.float32)
    return pixels.transpose(2, 0, 1)[None].copy(), mask[None, None]


def person_crop(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    margin: int | None = None,
    long_side: int = C.SD_NATIVE_SIZE,
    multiple: int = C.SD_SIZE_MULTIPLE,
    min_aspect: float = C.PERSON_CROP_MIN_ASPECT,
) -> tuple[np.ndarray, CropGeometry]:
    """The person's crop for img2img.

    Args:
        image: uint8 ``[H, W, 3]`` RGB scene.
        mask: bool ``[H, W]`` the person (cleaned, not dilated); must not be empty.
        margin: pixels around the person's box; default :func:`person_margin`.
        long_side: the crop's long side after resizing, up or down (SD's native ``SD_NATIVE_SIZE``).
        multiple: the padded sides are multiples of this (``SD_SIZE_MULTIPLE``: the exported UNet's need).
        min_aspect: the box is widened (within the image) to at least this short/long ratio.

    Returns:
        uint8 ``[h, w, 3]`` with ``max(h, w)`` = ``long_side`` rounded up to ``multiple``, and its geometry.
    """
    box = M.bounding_box(mask)
    if box is None:
        raise ValueError("mask is empty: there is no person to crop")
    crop_box = expand_box(box, person_margin(box) if margin is None else int(margin), image.shape[:2])
    crop_box = widen_box(crop_box, min_aspect, image.shape[:2])
    geometry = CropGeometry.plan(crop_box, long_side=long_side, multiple=multiple, upscale=True)
    return geometry.extract(_check_rgb(image)), geometry


def whole_image_crop(image: np.ndarray, long_side: int, multiple: int) -> tuple[np.ndarray, CropGeometry]:
    """The whole ``image`` ``[H, W, C]`` resized to ``long_side`` (up or down) and padded: placeholder
    inputs."""
    h, w = image.shape[:2]
    geometry = CropGeometry.plan((0, 0, w, h), long_side=long_side, multiple=multiple, upscale=True)
    return geometry.extract(image), geometry


def paste(scene: np.ndarray, patch: np.ndarray, geometry: CropGeometry, alpha: np.ndarray | None = None
          ) -> np.ndarray:
    """Put a model's output crop back into the scene; returns a new uint8 ``[H, W, 3]`` scene.

    Args:
        scene: uint8 ``[H, W, 3]``.
        patch: uint8 ``[out_h, out_w, 3]`` in the crop frame of ``geometry``.
        alpha: float ``[out_h, out_w]`` in 0..1 in the same crop frame (1 = the patch), or None for all of it.
    """
    out = _check_rgb(scene).copy()
    restored = geometry.restore(_check_rgb(patch)).astype(np.float32)
    region = out[geometry.y0:geometry.y1, geometry.x0:geometry.x1]
    if alpha is None:
        region[...] = np.rint(restored).astype(np.uint8)
        return out
    a = np.clip(geometry.restore(np.asarray(alpha, np.float32)), 0.0, 1.0)[..., None]
    region[...] = np.rint(a * restored + (1.0 - a) * region).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------------------------
def _resize(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    if arr.shape[:2] == (h, w):
        return arr.copy()
    shrinking = h <= arr.shape[0] and w <= arr.shape[1]
    out = cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return out.reshape(h, w, *arr.shape[2:])  # OpenCV drops a trailing channel axis of 1


def _fit_span(lo: int, hi: int, limit: int) -> tuple[int, int]:
    """Shift ``[lo, hi)`` into ``[0, limit)`` keeping its length if possible, else clip."""
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    return max(lo, 0), hi


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _ceil_to(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _check_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3] but is {arr.dtype} {arr.shape}")
    return arr
