"""isekai_segment end to end: the click-look-click loop against segment-anything's SamPredictor.

A real tritonserver on the small checkpoints, called over gRPC. Every served mask is compared with what
SamPredictor answers for the same photo, clicks and ``mask_input`` on the same tiny SAM checkpoint; where the
image embedding came from is read from the server (model statistics and the cache's own metrics), not a timer.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from skimage import data

from isekai import constants as C
from isekai.client.stats import cache_counters, model_stats, stats_delta
from tests.conftest import ASTRONAUT_CLICK, CACHE, png_bytes

pytestmark = pytest.mark.e2e

# ONNX Runtime and PyTorch add in another order: logits within ~1e-5 of the threshold may flip.
MAX_FLIPPED_FRACTION = 1e-4
NEGATIVE_CLICK = (260.0, 120.0)  # inside the first mask of ASTRONAUT_CLICK on the demo checkpoint
SECOND_CLICK = (330.0, 420.0)


def decode_mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))) > 127


@pytest.fixture(scope="module")
def predictor(demo_repository):
    """SamPredictor on the checkpoint the served SAM graphs were exported from."""
    path = Path(__file__).resolve().parents[1] / "reference_sam.py"
    spec = importlib.util.spec_from_file_location("reference_sam", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    from isekai.export.sam import load_sam  # noqa: PLC0415 - torch-heavy, and only after reference_sam's import

    return reference.SamPredictor(load_sam(CACHE / "checkpoints" / "sam_tiny.pth"))


def expected(predictor, rgb, points, labels, mask_input=None):
    """SamPredictor's answer as the exported decoder selects it (segment-anything's SamOnnxModel,
    return_single_mask): with the padding point, 2 prompt points -> best multimask output, more -> token 0."""
    predictor.set_image(rgb)
    multimask = len(points) + 1 <= 2
    masks, scores, low_res = predictor.predict(
        point_coords=np.asarray(points, np.float64), point_labels=np.asarray(labels),
        mask_input=None if mask_input is None else np.asarray(mask_input)[0],
        multimask_output=multimask, return_logits=True,
    )
    i = int(np.argmax(scores)) if multimask else 0
    return masks[i] > C.SAM_MASK_THRESHOLD, float(scores[i]), low_res[i]


def assert_same_mask(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert 0.001 < want.mean() < 0.999, "reference mask is all one value: the comparison would prove nothing"
    flipped = float((got != want).mean())
    assert flipped <= MAX_FLIPPED_FRACTION, f"{flipped:.2e} of the pixels differ from SamPredictor's mask"


@pytest.fixture()
def fresh_photo(request):
    """The astronaut, made unique per test (bytes no other test sent, so the cache has never seen them)."""
    rgb = data.astronaut().copy()
    rgb[0, 0] = (zlib.crc32(request.node.name.encode()) % 251, 7, 11)
    return rgb, png_bytes(rgb)


def test_second_click_costs_only_the_decoder_and_matches_sam_predictor(server, client, predictor,
                                                                       fresh_photo):
    rgb, photo = fresh_photo
    stats = grpcclient.InferenceServerClient(server.grpc_url)
    s0, c0 = model_stats(stats), cache_counters(server.metrics_url)
    first = client.segment(photo, [ASTRONAUT_CLICK])
    s1, c1 = model_stats(stats), cache_counters(server.metrics_url)
    second = client.segment(photo, [ASTRONAUT_CLICK, SECOND_CLICK])
    s2, c2 = model_stats(stats), cache_counters(server.metrics_url)

    assert stats_delta(s0, s1)["sam_encoder"].inferences == 1
    assert c1["misses"] - c0["misses"] == 1
    assert stats_delta(s1, s2)["sam_encoder"].inferences == 0, "the second click encoded the image again"
    assert stats_delta(s1, s2)["sam_decoder"].inferences == 1
    assert c2["hits"] - c1["hits"] == 1 and c2["misses"] == c1["misses"]
    for result, points in ((first, [ASTRONAUT_CLICK]), (second, [ASTRONAUT_CLICK, SECOND_CLICK])):
        want, score, low_res = expected(predictor, rgb, points, [1] * len(points))
        assert_same_mask(decode_mask(result.mask), want)
        assert result.score == pytest.approx(score, abs=1e-4)
        assert result.low_res_mask.shape == (1, 1, C.SAM_LOW_RES_SIZE, C.SAM_LOW_RES_SIZE)
        np.testing.assert_allclose(result.low_res_mask[0, 0], low_res, atol=1e-3)


def test_negative_click_removes_a_region_as_sam_predictor_does(client, predictor, fresh_photo):
    rgb, photo = fresh_photo
    positive = decode_mask(client.segment(photo, [ASTRONAUT_CLICK]).mask)
    with_negative = decode_mask(client.segment(photo, [ASTRONAUT_CLICK], negatives=[NEGATIVE_CLICK]).mask)
    want, _, _ = expected(predictor, rgb, [ASTRONAUT_CLICK, NEGATIVE_CLICK], [1, 0])
    assert_same_mask(with_negative, want)
    assert positive[int(NEGATIVE_CLICK[1]), int(NEGATIVE_CLICK[0])], (
        "the negative click must be on the first mask"
    )
    assert (positive & ~with_negative).sum() > 0, "the negative click removed nothing"


def test_low_res_mask_fed_back_changes_the_result_as_sam_predictor_does(client, predictor, fresh_photo):
    rgb, photo = fresh_photo
    session = client.segment_session(photo)
    first = session.click(ASTRONAUT_CLICK)
    second = session.click(SECOND_CLICK)  # sends first.low_res_mask as mask_input
    without = client.segment(photo, [ASTRONAUT_CLICK, SECOND_CLICK])
    want, _, _ = expected(predictor, rgb, [ASTRONAUT_CLICK, SECOND_CLICK], [1, 1],
                          mask_input=first.low_res_mask)
    assert_same_mask(decode_mask(second.mask), want)
    assert second.mask != without.mask, "mask_input made no difference"


def test_generate_after_clicks_gives_the_same_mask_and_does_not_encode_the_photo(server, client, fresh_photo):
    _, photo = fresh_photo
    stats = grpcclient.InferenceServerClient(server.grpc_url)
    # Two clicks, the second fed the first's low_res_mask, as an interactive session does before generating.
    session = client.segment_session(photo)
    session.click(ASTRONAUT_CLICK)
    selected = session.click(SECOND_CLICK)
    s0, c0 = model_stats(stats), cache_counters(server.metrics_url)
    swapped = session.swap(steps=2, seed=1)
    s1, c1 = model_stats(stats), cache_counters(server.metrics_url)

    assert swapped.mask == selected.mask
    assert swapped.score == pytest.approx(selected.score, abs=1e-6)
    assert swapped.result != swapped.background, "no person was found: the test would prove nothing"
    assert c1["hits"] - c0["hits"] == 1 and c1["misses"] == c0["misses"], "the photo was encoded again"
    # No sam_encoder run at all: compose cuts the character by the person's own mask (its default silhouette).
    assert stats_delta(s0, s1)["sam_encoder"].inferences == 0


def test_segment_and_run_commands_give_the_same_mask(server, tmp_path, fresh_photo):
    """The command-line loop: `isekai segment` twice (the second refines the first), then `isekai run`."""
    _, photo = fresh_photo
    (tmp_path / "photo.png").write_bytes(photo)

    def isekai(*argv: str) -> None:
        cmd = [sys.executable, "-m", "isekai.cli", *argv, "--url", server.grpc_url]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    click, second = (f"{x:g},{y:g}" for x, y in (ASTRONAUT_CLICK, SECOND_CLICK))
    isekai("segment", "photo.png", "--click", click, "--output", "m1.png", "--low-res-out", "m1.npy")
    isekai("segment", "photo.png", "--click", click, "--click", second, "--low-res-in", "m1.npy",
           "--output", "m2.png")
    isekai("run", "photo.png", "--click", click, "--click", second, "--low-res-in", "m1.npy", "--steps", "2",
           "--output", "out.png", "--mask", "run-mask.png")
    assert (tmp_path / "run-mask.png").read_bytes() == (tmp_path / "m2.png").read_bytes()
    assert (tmp_path / "m2.png").read_bytes() != (tmp_path / "m1.png").read_bytes()
    assert (tmp_path / "out.png").stat().st_size > 0
