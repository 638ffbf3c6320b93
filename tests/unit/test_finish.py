"""The finish stage without Triton: outscale at and beside the graph's scale, the probe, the graph check,
encoding.

The graph is a numpy fake (nearest-neighbour, which Real-ESRGAN's tiling reproduces exactly), counted per
call.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isekai import constants as C
from isekai.ensemble.finish import (
    finish_result,
    missing_graph_message,
    outscale,
    probe_scale,
    require_upscale_graph,
    resize_lanczos,
    upscale_graph,
)
from isekai.ensemble.images import encode_image
from isekai.ensemble.upscale import upscale_image


class Nearest:
    """A graph of scale ``scale``: f32 [1, 3, h, w] -> [1, 3, s*h, s*w] by pixel repetition; records input
    shapes."""

    def __init__(self, scale: int) -> None:
        self.scale = scale
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.calls.append(image.shape)
        return image.repeat(self.scale, axis=2).repeat(self.scale, axis=3)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def never_called(image: np.ndarray) -> np.ndarray:
    raise AssertionError("upscale 1 must not call the graph")


def test_factor_one_is_the_scene_itself():
    scene = photo(20, 30)
    assert outscale(scene, 1, never_called) is scene


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_probe_reads_the_graph_scale_with_one_small_call(scale):
    graph = Nearest(scale)
    assert probe_scale(graph) == scale
    assert graph.calls == [(1, 3, C.UPSCALE_PROBE_SIDE, C.UPSCALE_PROBE_SIDE)]


@pytest.mark.parametrize("wrong", [
    lambda x: x.repeat(3, axis=2).repeat(3, axis=3),  # x3: not a Real-ESRGAN scale
    lambda x: x.repeat(4, axis=2),  # only the height
    lambda x: x[:, :1].repeat(4, axis=2).repeat(4, axis=3),  # one channel
    lambda x: x[0],  # rank 3
])
def test_probe_refuses_a_graph_that_is_not_an_upscaler(wrong):
    with pytest.raises(RuntimeError, match=rf"{C.UPSCALE_MODEL} model returned shape"):
        probe_scale(wrong)


@pytest.mark.parametrize("factor", [2, 4])
def test_factor_equal_to_the_graph_scale_is_the_tiled_upscale(factor):
    scene, graph = photo(37, 53), Nearest(factor)
    out = outscale(scene, factor, graph)
    np.testing.assert_array_equal(out, scene.repeat(factor, axis=0).repeat(factor, axis=1))
    assert len(graph.calls) == 2  # the probe, then one tile: the scene fits in one


def test_x2_on_a_x4_graph_runs_x4_then_lanczos_down():
    """Real-ESRGAN's --outscale: the graph's own scale, then a resize to the asked size."""
    scene = photo(37, 53)
    out = outscale(scene, 2, Nearest(4))
    assert out.shape == (74, 106, 3) and out.dtype == np.uint8
    x4 = upscale_image(scene, Nearest(4), 4)
    np.testing.assert_array_equal(out, resize_lanczos(x4, 74, 106))
    flat = np.full((16, 16, 3), 77, np.uint8)
    np.testing.assert_array_equal(outscale(flat, 2, Nearest(4)), np.full((32, 32, 3), 77, np.uint8))


def test_x4_on_a_x2_graph_runs_x2_then_lanczos_up():
    scene = photo(21, 18)
    out = outscale(scene, 4, Nearest(2))
    assert out.shape == (84, 72, 3)
    np.testing.assert_array_equal(out, resize_lanczos(upscale_image(scene, Nearest(2), 2), 84, 72))


def test_a_known_graph_scale_skips_the_probe():
    graph = Nearest(4)
    outscale(photo(10, 12), 4, graph, graph_scale=4)
    assert graph.calls == [(1, 3, 10, 12)]


def test_a_scene_bigger_than_a_tile_is_upscaled_tile_by_tile():
    """600x400 at the default tile (512, pad 10): two tiles side by side, each seeing 10 pixels of the
    other."""
    scene, graph = photo(400, 600), Nearest(4)
    out = outscale(scene, 2, graph)
    assert out.shape == (800, 1200, 3)
    pad = C.UPSCALE_TILE_PAD
    assert graph.calls[1:] == [(1, 3, 400, C.UPSCALE_TILE + pad), (1, 3, 400, 600 - C.UPSCALE_TILE + pad)]
    big = outscale(scene, 4, Nearest(4))
    np.testing.assert_array_equal(big, scene.repeat(4, axis=0).repeat(4, axis=1))


def test_the_limit_is_the_results_and_the_graph_may_exceed_it_by_its_extra_scale():
    scene = photo(10, 10)
    assert outscale(scene, 2, Nearest(4), max_pixels=20 * 20).shape == (20, 20, 3)  # x4 made 40x40 on the way
    with pytest.raises(ValueError, match=r"upscale: x4 of a 10x10 .* 40x40 = 1600 pixels"):
        outscale(scene, 4, never_called, max_pixels=20 * 20)


@pytest.mark.parametrize("factor", [0, 3, -1])
def test_other_factors_are_refused(factor):
    with pytest.raises(ValueError, match="upscale must be one of"):
        outscale(photo(8, 8), factor, never_called)


def test_finish_encodes_the_scene_as_asked():
    scene = photo(24, 40)
    assert finish_result(scene, 1, "png", never_called) == encode_image(scene, "png")
    data = finish_result(scene, 4, "jpeg", Nearest(4))
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG" and decoded.size == (160, 96)


def test_require_upscale_graph(tmp_path: Path):
    require_upscale_graph(1, tmp_path)  # no graph needed for no upscale
    for factor in (2, 4):
        with pytest.raises(ValueError, match=rf"^upscale {factor} is not available") as refused:
            require_upscale_graph(factor, tmp_path)
        assert "isekai export esrgan --checkpoint" in str(refused.value)
        assert "(upscale/1/model.onnx)" in str(refused.value)
        assert str(tmp_path) not in str(refused.value), "callers see it: no server paths"
    graph = upscale_graph(tmp_path)
    graph.parent.mkdir(parents=True)
    graph.write_bytes(b"onnx")
    require_upscale_graph(4, tmp_path)
    assert graph == tmp_path / C.UPSCALE_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME
    assert missing_graph_message() in str(refused.value)
