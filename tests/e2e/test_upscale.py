"""The optional ``upscale`` input end to end: a real tritonserver on the small checkpoints, over gRPC.

The demo repository's graph is a tiny x4 RRDBNet, so ``upscale`` 4 runs it as it is and ``upscale`` 2 runs it
and halves the result with Lanczos (Real-ESRGAN's --outscale). A second server on the same repository without
the graph shows that such a repository still starts, serves ``upscale`` 1, and refuses 2 naming what to
export.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from isekai import constants as C
from isekai.client import api
from isekai.client.client import IsekaiClient
from isekai.client.stats import model_stats, stats_delta
from tests.conftest import ASTRONAUT_CLICK, png_bytes, start_server

pytestmark = pytest.mark.e2e

FAST = {"steps": 2, "seed": 5}  # wiring and sizes, not image quality
# The astronaut at half size, clicked at the same spot: x4 of it costs the tiny graph a quarter of the full
# photo's.
HALF_CLICK = (ASTRONAUT_CLICK[0] / 2, ASTRONAUT_CLICK[1] / 2)


def size_of(data: bytes) -> tuple[int, int]:
    """(H, W) of an encoded image."""
    width, height = Image.open(io.BytesIO(data)).size
    return height, width


@pytest.fixture(scope="module")
def triton(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def astronaut(astronaut_png) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(astronaut_png)).convert("RGB"))


@pytest.fixture(scope="module")
def photo(astronaut) -> bytes:
    """256x256: the astronaut at half size."""
    return png_bytes(np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.LANCZOS)))


@pytest.fixture(scope="module")
def plain(client, photo):
    """The swap without the upscale input."""
    return client.swap(photo, [HALF_CLICK], **FAST)


def swap_arrays(photo: bytes, click=HALF_CLICK, **options) -> dict[str, np.ndarray]:
    arrays = {
        api.IMAGE: np.array([photo], dtype=np.object_),
        api.POINTS: np.array([click], dtype=np.float32),
        api.LABELS: np.array([1], dtype=np.int32),
        api.STEPS: np.array([FAST["steps"]], dtype=np.int32),
    }
    arrays.update({name: np.array([value], dtype=np.int32) for name, value in options.items()})
    return arrays


def refused(triton, model: str, arrays: dict[str, np.ndarray], outputs,
            dtypes=api.DTYPES) -> InferenceServerException:
    inputs = []
    for name, value in arrays.items():
        t = grpcclient.InferInput(name, list(value.shape), dtypes[name])
        t.set_data_from_numpy(value)
        inputs.append(t)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                     client_timeout=600)
    return caught.value


@pytest.mark.parametrize("factor", [2, 4])
def test_upscale_makes_the_result_bigger_and_nothing_else(client, photo, plain, factor):
    out = client.swap(photo, [HALF_CLICK], upscale=factor, **FAST)
    height, width = size_of(photo)
    assert size_of(out.result) == (factor * height, factor * width)
    # mask and background stay at the photo's size: the very bytes of the swap without upscale
    assert out.mask == plain.mask and out.background == plain.background and out.score == plain.score
    assert size_of(out.background) == (height, width)


def test_upscale_1_is_the_swap_without_it(client, photo, plain):
    out = client.swap(photo, [HALF_CLICK], upscale=1, **FAST)
    assert (out.result, out.mask, out.background) == (plain.result, plain.mask, plain.background)


@pytest.mark.parametrize("factor", [3, 0, -1])
def test_other_factors_are_refused_naming_upscale(triton, photo, factor):
    err = refused(triton, api.SWAP_MODEL, swap_arrays(photo, upscale=factor), api.SWAP_OUTPUTS)
    assert err.status() == "StatusCode.INVALID_ARGUMENT", err.message()
    assert f"upscale must be one of 1, 2, 4 (1 = off) but is {factor}" in err.message()


def test_a_result_beyond_the_pixel_limit_is_refused_before_any_model(triton):
    side = int(C.MAX_UPSCALED_PIXELS**0.5) // 4  # x4 of side x (side + 1) is just over the limit
    photo = png_bytes(np.zeros((side, side + 1, 3), np.uint8))
    before = model_stats(triton)
    err = refused(triton, api.SWAP_MODEL, swap_arrays(photo, upscale=4), api.SWAP_OUTPUTS)
    assert err.status() == "StatusCode.INVALID_ARGUMENT", err.message()
    assert (
        f"upscale: x4 of a {side}x{side + 1} (HxW) image would be {4 * side}x{4 * (side + 1)}"
        in err.message()
    )
    ran = {name for name, d in stats_delta(before, model_stats(triton)).items() if d.inferences}
    assert not ran & {C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL, C.UPSCALE_MODEL}, ran


def test_a_result_bigger_than_a_tile_is_upscaled_tile_by_tile(client, triton, astronaut):
    """A 320x540 photo: the x4 graph's input is cut into two tiles (512 and 28 wide, each with 10 of
    context)."""
    wide = png_bytes(np.pad(astronaut[:320], ((0, 0), (0, 540 - 512), (0, 0)), mode="reflect"))
    before = model_stats(triton)
    out = client.swap(wide, [(ASTRONAUT_CLICK[0], 200.0)], upscale=2, **FAST)
    assert size_of(out.result) == (2 * 320, 2 * 540)
    assert size_of(out.mask) == size_of(out.background) == (320, 540)
    # one call to learn the graph's scale, then one per tile
    assert stats_delta(before, model_stats(triton))[C.UPSCALE_MODEL].inferences == 1 + 2


# -- a repository without the graph --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_graph_server(demo_repository: Path, tmp_path_factory):
    repository = tmp_path_factory.mktemp("no-upscale") / "model_repository"
    shutil.copytree(demo_repository, repository)
    (repository / C.UPSCALE_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME).unlink()
    server = start_server(repository, repository.parent / "server.log")
    yield server, repository
    server.stop(grace_s=30)


def test_a_repository_without_the_graph_serves_upscale_1_and_says_what_to_export(
    no_graph_server, demo_repository, photo, plain
):
    no_graph_server, repository = no_graph_server

    client = IsekaiClient(no_graph_server.grpc_url)
    triton = grpcclient.InferenceServerClient(no_graph_server.grpc_url)
    try:
        out = client.swap(photo, [HALF_CLICK], upscale=1, **FAST)
        assert (out.result, out.mask) == (plain.result, plain.mask), "the same models give the same bytes"
        err = refused(triton, api.SWAP_MODEL, swap_arrays(photo, upscale=2), api.SWAP_OUTPUTS)
        assert err.status() == "StatusCode.INVALID_ARGUMENT", err.message()
        assert "upscale 2 is not available" in err.message() and "isekai export esrgan" in err.message()
        # The upscale model itself is loaded (so the server started) and refuses every call until exported.
        assert triton.is_model_ready(C.UPSCALE_MODEL)
        tile = {C.ESRGAN_IN_IMAGE: np.zeros((1, 3, 8, 8), np.float32)}
        err = refused(triton, C.UPSCALE_MODEL, tile, [C.ESRGAN_OUT_UPSCALED], {C.ESRGAN_IN_IMAGE: "FP32"})
        assert err.status() == "StatusCode.UNAVAILABLE", err.message()
        assert "isekai export esrgan" in err.message()
        # Exported while the server runs: the next request uses it, without a reload.
        graph = Path(C.UPSCALE_MODEL) / C.MODEL_VERSION / C.ONNX_FILENAME
        shutil.copyfile(demo_repository / graph, repository / graph)
        out = client.swap(photo, [HALF_CLICK], upscale=2, **FAST)
        assert size_of(out.result) == (2 * 256, 2 * 256)
    finally:
        client.close()
        triton.close()
