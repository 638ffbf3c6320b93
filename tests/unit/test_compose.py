"""The prepare and compose stages end to end, with numpy stand-ins for SAM, LaMa and the diffusion."""

from __future__ import annotations

import numpy as np
import pytest

from isekai import constants as C
from isekai.ensemble import masks as M
from isekai.ensemble.compose import (
    Prepared,
    character_box_prompt,
    character_silhouette,
    compose_scene,
    inpainted_to_rgb,
    paste_background,
    prepare_person,
)
from isekai.ensemble.crops import CropGeometry

GRAY = 0.5
RED = (230, 20, 20)


def _scene(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _ellipse_logits(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """SAM-like logits: positive inside the ellipse, [1, 1, H, W] float32."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return (1.0 - np.hypot((xx - cx) / rx, (yy - cy) / ry)).astype(np.float32)[None, None] * 10


def _fake_lama(prepared: Prepared) -> np.ndarray:
    """Fills the hole with gray, leaves the rest (LaMa's output contract: float32 [1, 3, h, w] in 0..1)."""
    return np.where(prepared.lama_mask > 0, GRAY, prepared.lama_image).astype(np.float32)


def _fake_diffusion(prepared: Prepared) -> np.ndarray:
    return np.broadcast_to(np.array(RED, np.uint8), prepared.person_image.shape).copy()


@pytest.fixture(params=[(300, 400), (640, 360), (256, 256)], ids=["landscape", "portrait", "square"])
def case(request):
    h, w = request.param
    image = _scene(h, w)
    logits = _ellipse_logits(h, w, 0.5 * w, 0.55 * h, 0.12 * w, 0.3 * h)
    logits[0, 0, 2:5, 2:5] = 5.0  # a stray speck far from the click
    points = np.array([[0.5 * w, 0.55 * h]], np.float32)
    return image, logits, points


def test_prepare_person_outputs(case):
    image, logits, points = case
    h, w = image.shape[:2]
    p = prepare_person(image, logits, points, np.array([1], np.int32))
    assert p.found
    assert p.mask.shape == p.hole.shape == (h, w) and p.mask.dtype == p.hole.dtype == bool
    assert not p.mask[2:5, 2:5].any()  # the speck is gone
    np.testing.assert_array_equal(p.mask, M.clean(M.binarize(logits), points, np.array([1])))
    assert (p.hole >= p.mask).all() and p.hole.sum() > p.mask.sum()
    assert p.box.dtype == np.float32 and tuple(p.box.astype(int)) == M.bounding_box(p.mask)
    # LaMa inputs
    g = p.lama_geometry
    assert p.lama_image.shape == (1, 3, g.out_h, g.out_w) and p.lama_mask.shape == (1, 1, g.out_h, g.out_w)
    assert g.out_h % C.LAMA_MODULO == 0 and g.out_w % C.LAMA_MODULO == 0
    # person crop
    pg = p.person_geometry
    assert p.person_image.shape == (pg.out_h, pg.out_w, 3) and max(pg.work_h, pg.work_w) == C.SD_NATIVE_SIZE
    # the character box prompt is the person's box, in the crop's pixels
    np.testing.assert_allclose(pg.to_scene(p.character_box.reshape(2, 2)).reshape(4), p.box, atol=1e-3)
    # geometry travels as int64 [8]
    assert CropGeometry.from_array(g.to_array()) == g and CropGeometry.from_array(pg.to_array()) == pg


def test_compose_scene_replaces_the_person_and_keeps_the_rest(case):
    image, logits, points = case
    p = prepare_person(image, logits, points, np.array([1]))
    pg = p.person_geometry
    # SAM on the generated crop, prompted by character_box: a slightly thinner figure than the person.
    x0, y0, x1, y1 = p.character_box
    silhouette_logits = _ellipse_logits(pg.out_h, pg.out_w, (x0 + x1) / 2, (y0 + y1) / 2, 0.35 * (x1 - x0),
                                        0.45 * (y1 - y0))
    result, background = compose_scene(image, p.mask, p.hole, _fake_lama(p), p.lama_geometry,
                                       _fake_diffusion(p), silhouette_logits, pg)
    assert result.shape == background.shape == image.shape and result.dtype == background.dtype == np.uint8
    outside = ~p.hole
    np.testing.assert_array_equal(background[outside], image[outside])  # untouched outside the hole
    np.testing.assert_array_equal(result[outside], image[outside])
    assert np.abs(background[p.hole].astype(int) - 128).max() <= 1  # all of the hole is LaMa's
    silhouette_scene = pg.restore(M.binarize(silhouette_logits).astype(np.float32)) > 0.5
    core = np.zeros_like(p.mask)
    core[pg.y0:pg.y1, pg.x0:pg.x1] = M.clean(silhouette_scene) if silhouette_scene.any() else False
    core = core & ~M.dilate(~core, 6)  # away from the feathered edge
    assert core.any() and (result[core] == RED).all()
    gap = p.hole & ~M.dilate(core, 12)  # in the hole, away from the character: background shows
    assert gap.any() and np.abs(result[gap].astype(int) - 128).max() <= 1


def _carried(p: Prepared) -> np.ndarray:
    """The person's mask in the crop, mirrored into the padding like the crop's pixels."""
    pg = p.person_geometry
    work = pg.extract_mask(p.mask)[: pg.work_h, : pg.work_w]
    return np.pad(work, ((0, pg.out_h - pg.work_h), (0, pg.out_w - pg.work_w)), mode="symmetric")


def test_default_silhouette_is_the_person_mask_carried_over(case):
    """No SAM logits (compose's default source): the person's own mask; the character pasted through it."""
    image, logits, points = case
    p = prepare_person(image, logits, points, np.array([1]))
    pg = p.person_geometry
    silhouette = character_silhouette(None, p.mask, pg)
    np.testing.assert_array_equal(silhouette, _carried(p))
    assert silhouette[: pg.work_h, : pg.work_w].sum() == pg.extract_mask(p.mask).sum()
    result, _ = compose_scene(image, p.mask, p.hole, _fake_lama(p), p.lama_geometry, _fake_diffusion(p), None,
                              pg)
    inner = p.mask & ~M.dilate(~p.mask, 8)
    assert (result[inner] == RED).all()
    ring = p.hole & ~M.dilate(p.mask, 2)  # the dilated hole's ring: LaMa's background, but for the feather
    assert ring.any() and np.median(np.abs(result[ring].astype(int) - 128)) <= 1


def test_a_sam_silhouette_far_from_the_person_is_not_trusted(case):
    """Random-weight SAM (or a miss on a stylised character) gives a mask unlike the redrawn person: below
    SILHOUETTE_MIN_IOU overlap the person's mask is used."""
    image, logits, points = case
    p = prepare_person(image, logits, points, np.array([1]))
    pg = p.person_geometry
    elsewhere = _ellipse_logits(pg.out_h, pg.out_w, 0.1 * pg.work_w, 0.1 * pg.work_h, 0.08 * pg.work_w,
                                0.08 * pg.work_h)
    np.testing.assert_array_equal(character_silhouette(elsewhere, p.mask, pg), _carried(p))
    everything = np.full((1, 1, pg.out_h, pg.out_w), 5.0, np.float32)  # a mask over the whole crop
    np.testing.assert_array_equal(character_silhouette(everything, p.mask, pg), _carried(p))
    near = _carried(p).astype(np.float32)[None, None] * 10 - 5  # the person's shape: trusted
    assert (character_silhouette(near, p.mask, pg) == M.clean(M.binarize(near))).all()


def test_empty_silhouette_falls_back_to_the_person_shape(case):
    image, logits, points = case
    p = prepare_person(image, logits, points, np.array([1]))
    pg = p.person_geometry
    nothing = np.full((1, 1, pg.out_h, pg.out_w), -5.0, np.float32)
    silhouette = character_silhouette(nothing, p.mask, pg)
    np.testing.assert_array_equal(silhouette, _carried(p))
    result, _ = compose_scene(image, p.mask, p.hole, _fake_lama(p), p.lama_geometry, _fake_diffusion(p),
                              nothing, pg)
    inner = p.mask & ~M.dilate(~p.mask, 8)
    assert (result[inner] == RED).all()
    with pytest.raises(ValueError, match="silhouette_logits must be"):
        character_silhouette(nothing[..., :-1], p.mask, pg)


def test_no_person_found_is_an_answer_not_an_error():
    image = _scene(200, 300)
    logits = np.full((1, 1, 200, 300), -3.0, np.float32)
    logits[0, 0, 100, 150] = 1.0  # a few pixels: far below the minimum person area
    p = prepare_person(image, logits, np.array([[150.0, 100.0]]), np.array([1]))
    assert not p.found and not p.mask.any() and not p.hole.any() and not p.box.any()
    for g in (p.lama_geometry, p.person_geometry):
        assert max(g.work_h, g.work_w) <= C.PLACEHOLDER_SIDE
    assert not p.lama_mask.any()
    assert p.person_image.shape == (p.person_geometry.out_h, p.person_geometry.out_w, 3)
    result, background = compose_scene(image, p.mask, p.hole, _fake_lama(p), p.lama_geometry,
                                       _fake_diffusion(p),
                                       np.zeros((1, 1, p.person_geometry.out_h, p.person_geometry.out_w)),
                                       p.person_geometry)
    np.testing.assert_array_equal(result, image)
    np.testing.assert_array_equal(background, image)


def test_prepare_refuses_logits_of_another_size():
    with pytest.raises(ValueError, match="mask_logits must be"):
        prepare_person(_scene(100, 120), np.zeros((1, 1, 120, 100)), None, None)


def test_character_box_prompt_clips_to_the_crop():
    g = CropGeometry.plan((100, 100, 300, 400), long_side=512, multiple=8, upscale=True)
    box = character_box_prompt(np.array([150, 150, 250, 350]), g)
    np.testing.assert_allclose(g.to_scene(box.reshape(2, 2)).reshape(4), [150, 150, 250, 350], rtol=1e-6)
    clipped = character_box_prompt(np.array([0, 0, 1000, 1000]), g)
    np.testing.assert_allclose(clipped, [0, 0, g.work_w, g.work_h])


def test_inpainted_to_rgb_and_paste_background():
    raw = np.array([[[[-0.5, 0.0], [0.5, 2.0]]]] * 3, np.float32).reshape(1, 3, 2, 2)
    raw[0, 1, 0, 0] = np.nan
    rgb = inpainted_to_rgb(raw)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], [[0, 0], [128, 255]])
    assert rgb[0, 0, 1] == 0
    with pytest.raises(ValueError, match="inpainted must be"):
        inpainted_to_rgb(np.zeros((3, 2, 2)))
    image = _scene(64, 64)
    hole = np.zeros((64, 64), bool)
    hole[10:20, 10:20] = True
    g = CropGeometry.plan((0, 0, 64, 64), long_side=64, multiple=8, upscale=False)
    out = paste_background(image, hole, np.zeros((1, 3, 64, 64), np.float32), g)
    assert (out[hole] == 0).all()
    np.testing.assert_array_equal(out[~hole], image[~hole])
