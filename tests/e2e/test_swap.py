"""The isekai ensemble end to end: a real tritonserver on the small checkpoints, called over gRPC and HTTP."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image, ImageFilter

from isekai import constants as C
from isekai.client import api
from isekai.client.stats import cache_counters, model_stats, stats_delta
from tests.conftest import ASTRONAUT_CLICK, png_bytes

pytestmark = pytest.mark.e2e

FAST = {"steps": 4, "seed": 3}  # few steps: the tests prove wiring and determinism, not image quality


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def demo_swap(client, astronaut_png):
    return client.swap(astronaut_png, [ASTRONAUT_CLICK], seed=7)


def test_demo_request_returns_scene_mask_and_background(demo_swap, astronaut_png):
    scene = decode(astronaut_png)
    result, background, mask = decode(demo_swap.result), decode(demo_swap.background), decode(demo_swap.mask)
    assert result.shape == scene.shape and background.shape == scene.shape
    assert mask.shape == scene.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert np.isfinite(demo_swap.score)
    person = mask > 0
    assert person.any(), "the demo click must find a person-sized mask"
    # Outside the person (and LaMa's dilated margin) the scene is untouched; inside it changed.
    far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(61))).astype(bool)
    assert np.array_equal(background[far], scene[far])
    assert np.abs(background[person].astype(int) - scene[person]).mean() > 1.0
    assert np.abs(result[person].astype(int) - background[person]).mean() > 1.0


def test_same_seed_same_bytes_and_other_seed_differs(client, astronaut_png):
    first = client.swap(astronaut_png, [ASTRONAUT_CLICK], **FAST)
    second = client.swap(astronaut_png, [ASTRONAUT_CLICK], **FAST)
    other = client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=4, seed=4)
    assert first.result == second.result and first.background == second.background
    assert other.result != first.result


def test_second_click_served_from_embedding_cache(server, client, astronaut_png):
    stats = grpcclient.InferenceServerClient(server.grpc_url)
    fresh = png_bytes(np.asarray(decode(astronaut_png))[::-1].copy())  # bytes no earlier test sent
    before, c0 = model_stats(stats), cache_counters(server.metrics_url)
    first = client.swap(fresh, [ASTRONAUT_CLICK], **FAST)
    middle, c1 = model_stats(stats), cache_counters(server.metrics_url)
    client.swap(fresh, [ASTRONAUT_CLICK, (300.0, 400.0)], **FAST)
    after, c2 = model_stats(stats), cache_counters(server.metrics_url)
    assert first.result != first.background, "no person was found: the swap would prove nothing"
    # The first swap encodes the photo, once: compose cuts the character by the person's own mask (its default
    # silhouette), not by SAM on the generated crop. The second swap encodes nothing.
    assert stats_delta(before, middle)["sam_encoder"].inferences == 1
    assert (c1["misses"] - c0["misses"], c1["hits"] - c0["hits"]) == (1, 0)
    assert stats_delta(middle, after)["sam_encoder"].inferences == 0, "second click re-encoded the photo"
    assert (c2["misses"] - c1["misses"], c2["hits"] - c1["hits"]) == (0, 1)
    assert stats_delta(middle, after)["sam_decoder"].inferences == 1  # the click alone


def grayscale_png(rgb: np.ndarray) -> bytes:
    return png_bytes(np.asarray(Image.fromarray(rgb).convert("L")))


def rgba_png(rgb: np.ndarray) -> bytes:
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    return png_bytes(np.concatenate([rgb, alpha], axis=2), mode="RGBA")


def exif_rotated_jpeg(rgb: np.ndarray) -> bytes:
    """The photo stored sideways with EXIF orientation 6 (rotate 90 CW to display), as phones write it."""
    stored = Image.fromarray(np.rot90(rgb, k=1).copy())  # 90 CCW on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("make", [grayscale_png, rgba_png, exif_rotated_jpeg], ids=["gray", "rgba", "exif"])
def test_photo_variants(client, astronaut_png, make):
    scene = decode(astronaut_png)[:, :320]  # not square, so a missed EXIF rotation shows in the shapes
    out = client.swap(make(scene), [ASTRONAUT_CLICK], **FAST)
    result, mask = decode(out.result), decode(out.mask)
    assert mask.shape == scene.shape[:2], "EXIF orientation must be applied before the clicks are read"
    assert result.shape == scene.shape


def test_http_gives_the_same_result_as_grpc(server, client, astronaut_png):
    grpc_out = client.swap(astronaut_png, [ASTRONAUT_CLICK], **FAST)
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=600)
    inputs = []
    for name, value in (
        (api.IMAGE, np.array([astronaut_png], dtype=np.object_)),
        (api.POINTS, np.array([ASTRONAUT_CLICK], dtype=np.float32)),
        (api.LABELS, np.array([1], dtype=np.int32)),
        (api.STEPS, np.array([FAST["steps"]], dtype=np.int32)),
        (api.SEED, np.array([FAST["seed"]], dtype=np.int64)),
    ):
        t = httpclient.InferInput(name, list(value.shape), api.DTYPES[name])
        t.set_data_from_numpy(value, binary_data=True)
        inputs.append(t)
    out = http.infer(api.SWAP_MODEL, inputs)
    assert out.as_numpy(api.RESULT)[0] == grpc_out.result
    assert out.as_numpy(api.MASK)[0] == grpc_out.mask


def test_every_stub_runs_with_the_fixed_mmap_threshold(server):
    """Triton passes the server's environment on to each Python-backend stub, where onnxruntime's buffers are
    allocated: the threshold must reach them, not only tritonserver."""
    from isekai.serving.stubs import server_stubs  # noqa: PLC0415

    stubs = [s for s in server_stubs(server.process.pid) if not s.zombie]
    assert stubs
    for stub in stubs:
        environ = Path(f"/proc/{stub.pid}/environ").read_bytes().split(b"\0")
        assert f"MALLOC_MMAP_THRESHOLD_={C.MALLOC_MMAP_THRESHOLD}".encode() in environ, stub.model
