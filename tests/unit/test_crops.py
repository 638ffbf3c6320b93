"""Crop geometry (plan, serialization, coordinates, pixels) and the LaMa / person crops."""

from __future__ import annotations

import numpy as np
import pytest

from isekai import constants as C
from isekai.ensemble import masks as M
from isekai.ensemble.crops import (
    CropGeometry,
    expand_box,
    lama_crop,
    paste,
    person_crop,
    widen_box,
)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _rect_mask(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize(("box", "long_side", "upscale"), [
    ((10, 20, 1210, 820), 1024, False),  # landscape, shrunk
    ((0, 0, 300, 900), 512, True),  # portrait, shrunk
    ((5, 5, 105, 55), 512, True),  # small, enlarged
    ((5, 5, 105, 55), 1024, False),  # small, kept
    ((0, 0, 17, 17), 64, True),  # square, odd
])
def test_plan_sizes(box, long_side, upscale):
    g = CropGeometry.plan(box, long_side=long_side, multiple=8, upscale=upscale)
    bh, bw = box[3] - box[1], box[2] - box[0]
    if upscale or max(bh, bw) > long_side:
        assert max(g.work_h, g.work_w) == long_side
    else:
        assert (g.work_h, g.work_w) == (bh, bw)
    assert g.out_h % 8 == 0 and g.out_w % 8 == 0
    assert 0 <= g.out_h - g.work_h < 8 and 0 <= g.out_w - g.work_w < 8
    assert abs(g.scale_x - g.scale_y) <= 1.0 / min(bh, bw)  # only rounding separates the two axes


def test_geometry_serializes_to_a_small_int_array():
    g = CropGeometry.plan((3, 4, 203, 104), long_side=512, multiple=8, upscale=True)
    arr = g.to_array()
    assert arr.dtype == np.int64 and arr.shape == (CropGeometry.ARRAY_LEN,)
    assert CropGeometry.from_array(arr) == g
    assert CropGeometry.from_array(arr.astype(np.float32)[None]) == g  # [1, 8] and float tensors too
    with pytest.raises(ValueError, match="8 integers"):
        CropGeometry.from_array(arr[:7])
    with pytest.raises(ValueError, match="8 integers"):
        CropGeometry.from_array(arr + 0.5)
    with pytest.raises(ValueError, match="crop box"):
        CropGeometry(10, 0, 5, 10, 8, 8, 8, 8)
    with pytest.raises(ValueError, match="work <= out"):
        CropGeometry(0, 0, 10, 10, 16, 8, 8, 8)


@pytest.mark.parametrize("box", [(10, 20, 1210, 820), (0, 0, 300, 900), (5, 5, 105, 55)])
def test_coordinates_round_trip_and_corners_map_to_the_content_edges(box):
    g = CropGeometry.plan(box, long_side=512, multiple=8, upscale=True)
    np.testing.assert_allclose(g.to_crop(np.array([[box[0], box[1]], [box[2], box[3]]], float)),
                               [[0, 0], [g.work_w, g.work_h]])
    xy = np.random.default_rng(1).uniform(0, 2000, size=(10, 2))
    np.testing.assert_allclose(g.to_scene(g.to_crop(xy)), xy, rtol=1e-12)


def test_extract_resizes_and_mirrors_the_padding():
    img = _image(100, 150)
    g = CropGeometry.plan((10, 10, 110, 67), long_side=100, multiple=8, upscale=False)  # no scaling
    patch = g.extract(img)
    assert patch.shape == (g.out_h, g.out_w, 3) == (64, 104, 3) and patch.dtype == np.uint8
    np.testing.assert_array_equal(patch[:57, :100], img[10:67, 10:110])
    np.testing.assert_array_equal(patch[57, :100], patch[56, :100])  # symmetric padding
    np.testing.assert_array_equal(g.restore(patch), img[10:67, 10:110])
    with pytest.raises(ValueError, match="patch must be"):
        g.restore(patch[:-1])
    with pytest.raises(ValueError, match="does not fit"):
        g.extract(img[:50])


def test_extract_mask_is_conservative_when_shrinking():
    rng = np.random.default_rng(2)
    mask = rng.random((400, 600)) > 0.999  # isolated pixels: a plain resize would lose them
    g = CropGeometry.plan((0, 0, 600, 400), long_side=150, multiple=8, upscale=False)
    small = g.extract_mask(mask)
    assert small.shape == (g.out_h, g.out_w) and not small[g.work_h:].any() and not small[:, g.work_w:].any()
    ys, xs = np.nonzero(mask)
    crop_xy = g.to_crop(np.stack([xs + 0.5, ys + 0.5], axis=1))
    assert small[crop_xy[:, 1].astype(int), crop_xy[:, 0].astype(int)].all()


def test_expand_box_shifts_inside_then_clips():
    assert expand_box((50, 50, 60, 60), 10, (200, 200)) == (40, 40, 70, 70)
    assert expand_box((0, 5, 10, 15), 10, (200, 200)) == (0, 0, 30, 30)  # shifted, size kept
    assert expand_box((190, 190, 200, 200), 10, (200, 200)) == (170, 170, 200, 200)
    assert expand_box((0, 0, 100, 50), 80, (60, 120)) == (0, 0, 120, 60)  # larger than the image: clipped


def test_widen_box_reaches_the_aspect_within_the_image():
    x0, y0, x1, y1 = widen_box((100, 0, 130, 200), 0.75, (300, 400))
    assert (x1 - x0) >= 0.75 * (y1 - y0) and (y0, y1) == (0, 200) and x0 >= 0 and x1 <= 400
    assert widen_box((0, 0, 30, 200), 0.75, (200, 50)) == (0, 0, 50, 200)  # the image is narrower
    assert widen_box((0, 0, 100, 100), 0.75, (200, 200)) == (0, 0, 100, 100)


@pytest.mark.parametrize(("h", "w"), [(1500, 2000), (400, 300), (3000, 1000)])
def test_lama_crop_covers_the_hole_with_context(h, w):
    img = _image(h, w, seed=3)
    hole = _rect_mask(h, w, w // 3, h // 4, w // 2, h // 2)
    image_in, mask_in, g = lama_crop(img, hole)
    assert image_in.dtype == mask_in.dtype == np.float32
    assert image_in.shape == (1, 3, g.out_h, g.out_w) and mask_in.shape == (1, 1, g.out_h, g.out_w)
    assert g.out_h % C.LAMA_MODULO == 0 and g.out_w % C.LAMA_MODULO == 0
    assert max(g.work_h, g.work_w) <= C.LAMA_WORKING_SIZE
    assert image_in.min() >= 0 and image_in.max() <= 1
    assert set(np.unique(mask_in).tolist()) == {0.0, 1.0}
    hb = M.bounding_box(hole)
    assert g.x0 <= hb[0] and g.y0 <= hb[1] and g.x1 >= hb[2] and g.y1 >= hb[3]
    assert g.x1 - g.x0 > hb[2] - hb[0]  # some context around it
    # Every hole pixel is a hole pixel in LaMa's frame too: nothing of the person can survive.
    ys, xs = np.nonzero(hole)
    crop_xy = g.to_crop(np.stack([xs + 0.5, ys + 0.5], axis=1))
    assert mask_in[0, 0, crop_xy[:, 1].astype(int), crop_xy[:, 0].astype(int)].all()
    with pytest.raises(ValueError, match="hole is empty"):
        lama_crop(img, np.zeros((h, w), bool))


@pytest.mark.parametrize(("h", "w", "person"), [
    (1200, 1600, (700, 200, 900, 1000)),  # tall person, shrunk to 512
    (300, 400, (180, 100, 220, 190)),  # small person, enlarged to 512
    (800, 800, (0, 0, 800, 800)),  # the whole photo
])
def test_person_crop_is_sd_sized_and_contains_the_person(h, w, person):
    img = _image(h, w, seed=4)
    mask = _rect_mask(h, w, *person)
    crop, g = person_crop(img, mask)
    assert crop.dtype == np.uint8 and crop.shape == (g.out_h, g.out_w, 3)
    assert max(g.work_h, g.work_w) == C.SD_NATIVE_SIZE
    assert g.out_h % C.SD_VAE_FACTOR == 0 and g.out_w % C.SD_VAE_FACTOR == 0
    assert g.x0 <= person[0] and g.y0 <= person[1] and g.x1 >= person[2] and g.y1 >= person[3]
    bw, bh = g.x1 - g.x0, g.y1 - g.y0
    assert min(bw, bh) >= C.PERSON_CROP_MIN_ASPECT * max(bw, bh) - 1 or (bw == w or bh == h)


def test_paste_hard_soft_and_identity():
    scene = _image(120, 160, seed=5)
    g = CropGeometry.plan((20, 30, 120, 90), long_side=256, multiple=8, upscale=True)
    patch = np.full((g.out_h, g.out_w, 3), 7, np.uint8)
    hard = paste(scene, patch, g)
    assert (hard[30:90, 20:120] == 7).all()
    outside = np.ones((120, 160), bool)
    outside[30:90, 20:120] = False
    np.testing.assert_array_equal(hard[outside], scene[outside])
    np.testing.assert_array_equal(paste(scene, patch, g, alpha=np.zeros((g.out_h, g.out_w))), scene)
    np.testing.assert_array_equal(paste(scene, patch, g, alpha=np.ones((g.out_h, g.out_w))), hard)
    half = paste(scene, patch, g, alpha=np.full((g.out_h, g.out_w), 0.5)).astype(int)
    assert np.abs(half[30:90, 20:120] - (scene[30:90, 20:120].astype(int) + 7) / 2).max() <= 1
    same = CropGeometry.plan((20, 30, 120, 90), long_side=256, multiple=8, upscale=False)
    np.testing.assert_array_equal(paste(scene, same.extract(scene), same), scene)
    assert hard is not scene and (scene[30:90, 20:120] != 7).any()  # the input is not modified
