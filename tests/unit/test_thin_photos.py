"""Thin photos (each side >= MIN_IMAGE_SIDE, but one far shorter than the other) give LaMa inputs it can run.

LaMa's graph needs every input side >= LAMA_MIN_SIDE (its reflect-padded convolutions at 1/8 scale). Found by
the end-to-end click-on-nothing test: a 32x512 photo's placeholder crop was 8x64 and LaMa failed on it.
"""

from __future__ import annotations

import numpy as np
import pytest

from isekai import constants as C
from isekai.ensemble.compose import prepare_person
from isekai.ensemble.crops import CropGeometry, lama_crop


@pytest.mark.parametrize("h,w", [(C.MIN_IMAGE_SIDE, 4096), (4096, C.MIN_IMAGE_SIDE), (32, 512), (16, 16)])
def test_lama_crop_of_a_thin_photo_is_padded_to_lamas_minimum(h, w):
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    hole = np.zeros((h, w), bool)
    hole[h // 4 : h // 2 + 1, w // 4 : w // 2 + 1] = True
    pixels, mask, g = lama_crop(image, hole)
    assert min(g.out_h, g.out_w) >= C.LAMA_MIN_SIDE
    assert g.out_h % C.LAMA_MODULO == 0 and g.out_w % C.LAMA_MODULO == 0
    assert pixels.shape == (1, 3, g.out_h, g.out_w) and mask.shape == (1, 1, g.out_h, g.out_w)
    assert not mask[0, 0, g.work_h :].any() and not mask[0, 0, :, g.work_w :].any()  # padding is never hole
    assert g.restore(pixels[0].transpose(1, 2, 0)).shape[:2] == (g.box_h, g.box_w)


@pytest.mark.parametrize("h,w", [(32, 512), (512, 32), (C.MIN_IMAGE_SIDE, 2048)])
def test_no_person_placeholder_of_a_thin_photo_fits_lama(h, w):
    image = np.zeros((h, w, 3), np.uint8)
    p = prepare_person(image, np.full((1, 1, h, w), -3.0, np.float32), np.array([[1.0, 1.0]]), np.array([1]))
    assert not p.found
    assert min(p.lama_image.shape[2:]) >= C.LAMA_MIN_SIDE


def test_min_side_pads_without_stretching():
    g = CropGeometry.plan((0, 0, 512, 32), long_side=64, multiple=8, upscale=True, min_side=16)
    assert (g.work_h, g.work_w) == (4, 64)  # the photo's aspect ratio is kept
    assert (g.out_h, g.out_w) == (16, 64)
