"""Mask operations: threshold, cleanup with clicks, dilation, feathering, boxes, "found"."""

from __future__ import annotations

import numpy as np
import pytest

from isekai import constants as C
from isekai.ensemble import masks as M


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return np.hypot(xx - cx, yy - cy) <= r


def test_binarize_thresholds_logits_of_any_leading_shape():
    logits = np.array([[-1.0, 0.0, 0.5], [np.nan, 3.0, -0.1]], np.float32)
    expected = np.array([[False, False, True], [False, True, False]])
    np.testing.assert_array_equal(M.binarize(logits), expected)
    np.testing.assert_array_equal(M.binarize(logits[None, None]), expected)
    np.testing.assert_array_equal(M.binarize(logits, threshold=-0.5),
                                  [[False, True, True], [False, True, True]])
    with pytest.raises(ValueError, match=r"logits must be \[H, W\]"):
        M.binarize(np.zeros((2, 3, 4)))


def test_clean_drops_far_specks_and_keeps_clicked_or_big_parts():
    person = _disc(200, 200, 100, 100, 50)
    speck_far = _disc(200, 200, 10, 10, 2)
    speck_clicked = _disc(200, 200, 190, 20, 2)
    second_part = _disc(200, 200, 100, 185, 12)  # e.g. a foot behind an obstacle: > 1% of the area
    mask = person | speck_far | speck_clicked | second_part
    points = np.array([[100.0, 100.0], [193.0, 20.0]])  # the second click is 3 px off its speck
    out = M.clean(mask, points, np.array([1, 1]))
    np.testing.assert_array_equal(out, person | speck_clicked | second_part)
    # A negative click does not keep a speck alive.
    out = M.clean(mask, points, np.array([1, 0]))
    np.testing.assert_array_equal(out, person | second_part)


def test_clean_fills_pinholes_but_not_negatively_clicked_or_big_holes():
    person = _disc(200, 200, 100, 100, 60)
    pinhole = _disc(200, 200, 80, 80, 2)
    clicked_hole = _disc(200, 200, 120, 120, 2)
    big_hole = _disc(200, 200, 100, 130, 12)  # > 1% of the mask's area
    mask = person & ~pinhole & ~clicked_hole & ~big_hole
    out = M.clean(mask, np.array([[100.0, 100.0], [120.0, 120.0]]), np.array([1, 0]))
    np.testing.assert_array_equal(out, person & ~clicked_hole & ~big_hole)


def test_clean_keeps_the_largest_when_all_islands_are_small():
    mask = np.zeros((100, 100), bool)
    sizes = [3, 4, 5]
    for i, s in enumerate(sizes):
        mask[10 + 30 * i:10 + 30 * i + s, 10:10 + s] = True
    out = M.clean(mask, min_island_fraction=0.9)
    assert out.sum() == 25 and out[70:75, 10:15].all()
    assert not M.clean(np.zeros((20, 20), bool)).any()


def test_dilate_is_a_round_disc_of_the_given_radius():
    mask = np.zeros((61, 61), bool)
    mask[30, 30] = True
    out = M.dilate(mask, 10)
    yy, xx = np.mgrid[0:61, 0:61]
    np.testing.assert_array_equal(out, np.hypot(xx - 30, yy - 30) <= 10)
    np.testing.assert_array_equal(M.dilate(mask, 0), mask)
    assert not M.dilate(np.zeros((5, 5), bool), 3).any()


def test_dilated_mask_covers_every_pixel_within_px_of_the_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.98
    out = M.dilate(mask, 3.5)
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[0:40, 0:50]
    dist = np.min(np.hypot(xx[..., None] - xs, yy[..., None] - ys), axis=-1)
    np.testing.assert_array_equal(out, dist <= 3.5)


def test_feather_ramps_across_the_edge_and_preserves_area():
    mask = _disc(120, 120, 60, 60, 30)
    alpha = M.feather(mask, 4.0)
    assert alpha.dtype == np.float32 and alpha.min() >= 0 and alpha.max() <= 1
    assert alpha[60, 60] == 1.0 and alpha[5, 5] == 0.0
    assert 0.3 < alpha[60, 90] < 0.7  # the edge is at x = 90
    assert alpha[60, 84] == 1.0 and alpha[60, 96] == 0.0  # beyond one radius on either side
    assert abs(alpha.sum() - mask.sum()) / mask.sum() < 0.02
    row = alpha[60, 60:]
    assert (np.diff(row) <= 1e-6).all()  # monotonic outward
    np.testing.assert_array_equal(M.feather(mask, 0), mask.astype(np.float32))
    assert (M.feather(np.ones((5, 5), bool), 3) == 1).all() and not M.feather(np.zeros((5, 5), bool), 3).any()


def test_bounding_box_uses_exclusive_pixel_edges():
    mask = np.zeros((10, 20), bool)
    mask[5, 3] = True
    assert M.bounding_box(mask) == (3, 5, 4, 6)
    mask[7, 12] = True
    assert M.bounding_box(mask) == (3, 5, 13, 8)
    assert M.bounding_box(np.zeros((4, 4), bool)) is None


def test_person_found_uses_the_documented_minimum_area():
    h = w = 1000
    mask = np.zeros((h, w), bool)
    assert not M.person_found(mask)
    n = int(C.PERSON_MIN_AREA_FRACTION * h * w)
    mask.reshape(-1)[: n - 1] = True
    assert not M.person_found(mask)
    mask.reshape(-1)[n - 1] = True
    assert M.person_found(mask)


def test_default_radii_scale_with_the_image_and_have_a_floor():
    assert M.dilation_px((4000, 3000)) == round(C.MASK_DILATE_FRACTION * 4000)
    assert M.dilation_px((20, 20)) == C.MASK_DILATE_MIN_PX
    assert M.click_radius((3000, 4000, 3)) == pytest.approx(C.MASK_CLICK_RADIUS_FRACTION * 4000)
    assert M.click_radius((20, 20)) == C.MASK_CLICK_RADIUS_MIN_PX
