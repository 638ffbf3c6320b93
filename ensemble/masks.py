"""Mask operations between SAM and the crops: threshold, clean, dilate, feather, box, "was anyone found?".

Masks are bool ``[H, W]`` in image pixels; logits are float ``[H, W]`` (``[1, H, W]`` and ``[1, 1, H, W]`` are
accepted and squeezed). Distances are Euclidean, in pixels (OpenCV's exact distance transform), so dilation
and feathering are round, not square, and cost the same at any radius.
"""

from __future__ import annotations

import cv2
import numpy as np

from isekai import constants as C

BoxXYXY = tuple[int, int, int, int]


def as_2d(array: np.ndarray, name: str = "mask") -> np.ndarray:
    """Squeeze leading singleton axes: ``[1, 1, H, W]`` / ``[1, H, W]`` / ``[H, W]`` -> ``[H, W]``."""
    arr = np.asarray(array)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be [H, W] (or [1, 1, H, W]) but has shape {np.shape(array)}")
    return arr


def binarize(logits: np.ndarray, threshold: float = C.SAM_MASK_THRESHOLD) -> np.ndarray:
    """SAM logits ``[H, W]`` (or ``[1, 1, H, W]``) -> bool ``[H, W]``: True where ``logit > threshold``.

    NaN counts as background.
    """
    return np.asarray(as_2d(logits, "logits") > threshold)


def click_radius(shape: tuple[int, ...]) -> float:
    """Pixels within which a component counts as "at" a click, for an image of ``shape`` ``(H, W, ...)``."""
    return max(float(C.MASK_CLICK_RADIUS_MIN_PX), C.MASK_CLICK_RADIUS_FRACTION * max(shape[0], shape[1]))


def dilation_px(shape: tuple[int, ...]) -> int:
    """Default LaMa hole dilation in pixels for an image of ``shape`` ``(H, W, ...)``."""
    return max(C.MASK_DILATE_MIN_PX, int(round(C.MASK_DILATE_FRACTION * max(shape[0], shape[1]))))


def clean(
    mask: np.ndarray,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    min_island_fraction: float = C.MASK_MIN_ISLAND_FRACTION,
    max_hole_fraction: float = C.MASK_MAX_HOLE_FRACTION,
    radius: float | None = None,
) -> np.ndarray:
    """Drop stray islands and fill pinholes of a mask, respecting the user's clicks.

    Islands (8-connected) smaller than ``min_island_fraction`` of the mask's area are dropped unless a
    positive click is within ``radius`` pixels of them (a clicked small part is what the user asked for).
    Holes (4-connected background not touching the border) smaller than ``max_hole_fraction`` of the remaining
    area are filled unless a negative click is inside them. If every island would go, the largest stays.

    Args:
        mask: bool ``[H, W]``.
        points: ``[N, 2]`` ``(x, y)`` clicks in pixels, or None.
        labels: ``[N]`` 1 positive, 0 negative, or None.
        radius: "near a positive click" in pixels; default :func:`click_radius`.

    Returns:
        A new bool ``[H, W]``.
    """
    m = as_2d(mask).astype(bool)
    pts = np.zeros((0, 2)) if points is None else np.asarray(points, np.float64).reshape(-1, 2)
    lbl = np.zeros((0,)) if labels is None else np.asarray(labels).reshape(-1)
    positive, negative = pts[lbl == 1], pts[lbl == 0]
    r = click_radius(m.shape) if radius is None else float(radius)
    m = _drop_islands(m, positive, min_island_fraction, r)
    return _fill_holes(m, negative, max_hole_fraction)


def dilate(mask: np.ndarray, px: float) -> np.ndarray:
    """Grow a bool ``[H, W]`` mask by a disc of radius ``px`` pixels (every pixel within ``px`` of the
    mask)."""
    m = as_2d(mask).astype(bool)
    if px <= 0 or not m.any():
        return m.copy()
    return _distance_to(m) <= px


def feather(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soft alpha for a bool ``[H, W]`` mask: float32 ``[H, W]`` in 0..1.

    A linear ramp across the mask's edge by signed distance: 0.5 on the edge, 1 at ``radius`` pixels inside,
    0 at ``radius`` pixels outside (so the alpha's total is about the mask's area: no halo, no shrinking).
    ``radius <= 0`` gives the hard mask as 0/1.
    """
    m = as_2d(mask).astype(bool)
    if radius <= 0 or not m.any() or m.all():
        return m.astype(np.float32)
    # Distances between pixel centres; the edge lies half a pixel from the last pixel on either side.
    signed = np.where(m, _distance_to(~m) - 0.5, 0.5 - _distance_to(m))
    return np.clip(0.5 + signed / (2.0 * radius), 0.0, 1.0).astype(np.float32)


def bounding_box(mask: np.ndarray) -> BoxXYXY | None:
    """Tight box ``(x0, y0, x1, y1)`` of a bool ``[H, W]`` mask in pixel edges (x1, y1 exclusive); None if
    empty."""
    m = as_2d(mask).astype(bool)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def area_fraction(mask: np.ndarray) -> float:
    """Fraction of the pixels that are True."""
    m = as_2d(mask)
    return float(np.count_nonzero(m)) / m.size


def person_found(mask: np.ndarray, min_fraction: float = C.PERSON_MIN_AREA_FRACTION) -> bool:
    """Whether a (cleaned) mask is big enough to be a person: at least ``min_fraction`` of the image.

    A click on nothing gives a tiny or empty mask; that is an answer ("no person here"), not an error.
    """
    return area_fraction(mask) >= min_fraction and bool(as_2d(mask).any())


# ------------------------------------------------------------------------------------------------------------
def _distance_to(mask: np.ndarray) -> np.ndarray:
    """float32 ``[H, W]``: distance of every pixel to the nearest True pixel of ``mask`` (0 on it)."""
    # OpenCV measures from non-zero pixels to the nearest zero one, so the targets are the zeros.
    return cv2.distanceTransform(np.where(mask, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _drop_islands(m: np.ndarray, positive: np.ndarray, min_fraction: float, radius: float) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    if n <= 2:  # background plus at most one island: nothing to choose between
        return m
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    keep = areas >= min_fraction * areas[1:].sum()
    for label in _labels_near(lab, positive, radius):
        keep[label] = True
    keep[0] = False
    if not keep.any():
        keep[1 + int(np.argmax(areas[1:]))] = True
    return keep[lab]


def _fill_holes(m: np.ndarray, negative: np.ndarray, max_fraction: float) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats((~m).astype(np.uint8), connectivity=4)
    if n <= 1:
        return m
    h, w = m.shape
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    right, bottom = left + stats[:, cv2.CC_STAT_WIDTH], top + stats[:, cv2.CC_STAT_HEIGHT]
    inside = (left > 0) & (top > 0) & (right < w) & (bottom < h)
    fill = inside & (stats[:, cv2.CC_STAT_AREA] <= max_fraction * np.count_nonzero(m))
    for label in _labels_near(lab, negative, 0.0):
        fill[label] = False
    fill[0] = False  # label 0 is the mask itself here
    return m | fill[lab]


def _labels_near(lab: np.ndarray, points: np.ndarray, radius: float) -> set[int]:
    """Component labels (> 0) with a pixel within ``radius`` of any ``(x, y)`` point (radius 0: the pixel
    hit)."""
    h, w = lab.shape
    found: set[int] = set()
    r = int(np.ceil(radius))
    for x, y in points:
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        col, row = int(np.clip(np.floor(x), 0, w - 1)), int(np.clip(np.floor(y), 0, h - 1))
        r0, r1, c0, c1 = max(row - r, 0), min(row + r + 1, h), max(col - r, 0), min(col + r + 1, w)
        window = lab[r0:r1, c0:c1]
        yy, xx = np.mgrid[r0:r1, c0:c1]
        near = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= radius**2 if r > 0 else np.ones_like(window, bool)
        found.update(int(v) for v in np.unique(window[near]) if v > 0)
    return found
