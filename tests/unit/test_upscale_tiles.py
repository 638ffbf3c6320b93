"""Tiled upscaling (ensemble/upscale.py) against running the model on the whole image, with numpy fake models.

The fakes' outputs depend only on a small neighbourhood of each pixel, so cutting the image into tiles with
enough context must give the untiled result bit for bit; one fake whose neighbourhood is larger than the
context shows the comparison can fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from isekai import constants as C
from isekai.ensemble import upscale as U


def nearest(scale: int):
    """Nearest-neighbour upsampling: each pixel depends on itself only."""
    def run(x: np.ndarray) -> np.ndarray:
        return x.repeat(scale, axis=2).repeat(scale, axis=3)
    return run


def box_then_nearest(scale: int, radius: int):
    """A (2r+1)^2 mean, edge-padded (a conv-like model of receptive radius r), then nearest upsampling."""
    def run(x: np.ndarray) -> np.ndarray:
        h, w = x.shape[2:]
        padded = np.pad(x, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
        total = np.zeros_like(x)
        for dy in range(2 * radius + 1):  # a fixed order of sums: each output pixel is computed identically
            for dx in range(2 * radius + 1):
                total += padded[:, :, dy:dy + h, dx:dx + w]
        return nearest(scale)(total / np.float32((2 * radius + 1) ** 2))
    return run


def unshuffle_like(scale: int):
    """Mimics a pixel-unshuffling network (x2: blocks of 2, x1: of 4): refuses sides that are not multiples
    of the block, and mixes each aligned block, so a tile off the block grid would change the result."""
    block = U.input_multiple(scale)

    def run(x: np.ndarray) -> np.ndarray:
        h, w = x.shape[2:]
        assert h % block == 0 and w % block == 0, f"x{scale} model got an input of {h}x{w}"
        means = x.reshape(1, 3, h // block, block, w // block, block).mean(axis=(3, 5))
        upsample = 4  # RRDBNet always upsamples x4 after the unshuffle
        return (means.repeat(upsample, axis=2).repeat(upsample, axis=3) + 0.5 * nearest(scale)(x)).astype(
            np.float32
        )
    return run


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, height, width), dtype=np.float32)


def whole(image: np.ndarray, fn, scale: int) -> np.ndarray:
    """The untiled result: one tile that holds the whole image."""
    return U.upscale_tiled(image, fn, scale, tile=U.input_multiple(scale) * 4096)


# ---------------------------------------------------------------------------------------------------------
# Tiles.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "height, width, tile, pad", [(37, 23, 8, 3), (16, 16, 16, 5), (5, 70, 32, 0), (3, 3, 8, 2)]
)
def test_tiles_partition_the_image_and_keep_context_inside(height, width, tile, pad):
    tiles = U.plan_tiles(height, width, tile, pad)
    owned = np.zeros((height, width), dtype=int)
    for t in tiles:
        owned[t.y0:t.y1, t.x0:t.x1] += 1
        assert t.y1 - t.y0 <= tile and t.x1 - t.x0 <= tile
        assert (t.py0, t.px0) == (max(t.y0 - pad, 0), max(t.x0 - pad, 0))
        assert (t.py1, t.px1) == (min(t.y1 + pad, height), min(t.x1 + pad, width))
    assert np.all(owned == 1)
    assert len(tiles) == -(-height // tile) * -(-width // tile)


def test_pasted_part_maps_owned_square_to_output():
    t = U.plan_tiles(40, 40, 16, 5)[4]  # the middle tile: context on every side
    assert (t.y0, t.y1, t.py0, t.py1) == (16, 32, 11, 37)
    rows, cols = t.pasted_from(2)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (10, 42, 10, 42)
    rows, cols = t.pasted_to(2)
    assert (rows.start, rows.stop) == (32, 64)


# ---------------------------------------------------------------------------------------------------------
# Tiled == untiled.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [4, 2, 1])
@pytest.mark.parametrize("size", [(37, 53), (16, 16), (17, 9), (1, 1), (2, 7)])
def test_tiled_equals_untiled_for_local_models(scale, size):
    image = random_image(*size, seed=sum(size))
    for fn in (nearest(scale), box_then_nearest(scale, radius=2)):
        got = U.upscale_tiled(image, fn, scale, tile=8, tile_pad=4)
        assert got.shape == (1, 3, scale * size[0], scale * size[1]) and got.dtype == np.float32
        np.testing.assert_array_equal(got, whole(image, fn, scale))


def test_nearest_is_the_image_itself_at_every_scale_and_odd_size():
    """Padding to even (x2) or to 4 (x1) and cropping back leaves the original pixels where they were."""
    image = random_image(13, 11, seed=3)
    for scale in (4, 2, 1):
        got = U.upscale_tiled(image, nearest(scale), scale, tile=4, tile_pad=2)
        np.testing.assert_array_equal(got, nearest(scale)(image))


def test_context_smaller_than_the_receptive_field_shows_seams():
    image = random_image(32, 32, seed=4)
    fn = box_then_nearest(2, radius=3)
    assert not np.array_equal(U.upscale_tiled(image, fn, 2, tile=8, tile_pad=2), whole(image, fn, 2))
    np.testing.assert_array_equal(U.upscale_tiled(image, fn, 2, tile=8, tile_pad=4), whole(image, fn, 2))


@pytest.mark.parametrize("scale", [2, 1])
@pytest.mark.parametrize("size", [(33, 47), (9, 14), (1, 3)])
def test_unshuffling_models_see_whole_blocks_on_the_image_grid(scale, size):
    """Odd sizes at x2 (and non-multiples of 4 at x1) are padded by reflection; tiles stay on the block grid
    (x1 with tile_pad 10 gets 12 of context), so tiled == untiled exactly."""
    image = random_image(*size, seed=5)
    fn = unshuffle_like(scale)
    got = U.upscale_tiled(image, fn, scale, tile=8, tile_pad=10)
    assert got.shape == (1, 3, scale * size[0], scale * size[1])
    np.testing.assert_array_equal(got, whole(image, fn, scale))


def test_reflection_padding_of_odd_sides():
    """x2 of a 3x5 image: the model sees 4x6, row 4 a reflection of row 2, column 6 of column 4."""
    seen: list[np.ndarray] = []

    def spy(x: np.ndarray) -> np.ndarray:
        seen.append(x.copy())
        return nearest(2)(x)

    image = random_image(3, 5, seed=6)
    U.upscale_tiled(image, spy, 2)
    (x,) = seen
    assert x.shape == (1, 3, 4, 6)
    np.testing.assert_array_equal(x[:, :, :3, :5], image)
    np.testing.assert_array_equal(x[:, :, 3, :5], image[:, :, 1])
    np.testing.assert_array_equal(x[:, :, :3, 5], image[:, :, :, 3])


def test_image_smaller_than_a_tile_is_one_call_on_the_whole_image():
    calls: list[tuple[int, ...]] = []

    def spy(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return nearest(4)(x)

    U.upscale_tiled(random_image(300, 200), spy, 4)
    assert calls == [(1, 3, 300, 200)]
    calls.clear()
    U.upscale_tiled(random_image(C.UPSCALE_TILE + 1, 40), spy, 4)  # one row of pixels spills into a 2nd tile
    pad = C.UPSCALE_TILE_PAD
    assert calls == [(1, 3, C.UPSCALE_TILE + 1, 40), (1, 3, 1 + pad, 40)]


def test_default_tiles_join_seamlessly():
    image = random_image(C.UPSCALE_TILE + 70, C.UPSCALE_TILE + 3, seed=7)
    fn = box_then_nearest(2, radius=C.UPSCALE_TILE_PAD)
    np.testing.assert_array_equal(U.upscale_tiled(image, fn, 2), whole(image, fn, 2))


# ---------------------------------------------------------------------------------------------------------
# 8-bit images.
# ---------------------------------------------------------------------------------------------------------
def test_uint8_round_trip_is_exact():
    image = np.random.default_rng(8).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    got = U.upscale_image(image, nearest(2), 2, tile=8, tile_pad=2)
    assert got.dtype == np.uint8 and got.shape == (42, 68, 3)
    np.testing.assert_array_equal(got, image.repeat(2, axis=0).repeat(2, axis=1))


def test_uint8_equals_converted_float_path():
    image = np.random.default_rng(9).integers(0, 256, (19, 30, 3), dtype=np.uint8)
    fn = box_then_nearest(4, radius=1)
    got = U.upscale_image(image, fn, 4, tile=8, tile_pad=2)
    as_float = (image.astype(np.float32).transpose(2, 0, 1)[None] / 255).astype(np.float32)
    want = U.to_uint8(whole(as_float, fn, 4)[0].transpose(1, 2, 0))
    np.testing.assert_array_equal(got, want)


def test_uint8_clips_and_rounds_half_to_even():
    values = np.array([-0.3, 0.0, 0.5, 1.0, 1.7, 254.5 / 255], dtype=np.float32)
    np.testing.assert_array_equal(U.to_uint8(values), [0, 0, 128, 255, 255, 254])

    def out_of_range(x: np.ndarray) -> np.ndarray:
        return np.where(nearest(4)(x) > 0.5, 2.0, -1.0).astype(np.float32)

    got = U.upscale_image(np.full((4, 4, 3), 200, dtype=np.uint8), out_of_range, 4)
    assert np.all(got == 255)


# ---------------------------------------------------------------------------------------------------------
# Limits and bad inputs.
# ---------------------------------------------------------------------------------------------------------
def never_called(x: np.ndarray) -> np.ndarray:
    raise AssertionError("the model ran before the limit check")


def test_output_pixel_limit():
    side = int(C.MAX_UPSCALED_PIXELS**0.5) // 4
    assert U.check_upscale_size(side, side, 4) == (4 * side, 4 * side)
    message = rf"upscale: x4 of a {side + 1}x{side} .* {4 * side + 4}x{4 * side} "
    with pytest.raises(ValueError, match=message) as info:
        U.check_upscale_size(side + 1, side, 4)
    assert "MAX_UPSCALED_PIXELS" in str(info.value)

    assert U.upscale_image(np.zeros((4, 4, 3), np.uint8), nearest(2), 2, max_pixels=64).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="x2 of a 4x5 .* 8x10 = 80 pixels, more than the limit of 64"):
        U.upscale_image(np.zeros((4, 5, 3), np.uint8), never_called, 2, max_pixels=64)
    with pytest.raises(ValueError, match="upscale: x4"):
        U.upscale_tiled(random_image(5, 5), never_called, 4, max_pixels=399)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((4, 4, 4), np.uint8), r"\(4, 4, 4\)"),
        (np.zeros((0, 4, 3), np.uint8), "H, W >= 1"),
    ],
)
def test_bad_uint8_images_are_refused(image, message):
    with pytest.raises(ValueError, match=f"upscale: image must be .*{message}"):
        U.upscale_image(image, never_called, 4)


def test_bad_float_images_scales_and_tiles_are_refused():
    with pytest.raises(ValueError, match="float32"):
        U.upscale_tiled(random_image(4, 4).astype(np.float64), never_called, 4)
    with pytest.raises(ValueError, match=r"\[1, 3, H, W\]"):
        U.upscale_tiled(random_image(4, 4)[0], never_called, 4)
    with pytest.raises(ValueError, match="scale must be one of .* but is 3"):
        U.upscale_tiled(random_image(4, 4), never_called, 3)
    with pytest.raises(ValueError, match="tile must be a positive multiple of 2 at x2 but is 511"):
        U.upscale_tiled(random_image(4, 4), never_called, 2, tile=511)
    with pytest.raises(ValueError, match="tile_pad must be >= 0"):
        U.upscale_tiled(random_image(4, 4), never_called, 4, tile_pad=-1)


def test_wrong_model_output_names_the_model():
    with pytest.raises(RuntimeError, match=rf"{C.UPSCALE_MODEL} model returned shape \(1, 3, 8, 8\)"):
        U.upscale_tiled(random_image(4, 4), nearest(2), 4)
