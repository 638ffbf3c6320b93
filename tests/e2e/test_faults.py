"""Faults inside a running server: a full embedding cache, a UNet raising mid-loop, a stub killed with
SIGKILL.

One ``isekai serve`` (the real command, with its supervisor) on a private copy of the small-checkpoint
repository, changed in two places: the embedding cache keeps at most 2 embeddings, and unet's model.py is a
test-only subclass that raises in its K-th call once a marker file appears (production code has no fault
switch).
"""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from isekai import constants as C
from isekai.client.client import IsekaiClient
from isekai.client.stats import cache_counters
from isekai.serving.stubs import server_stubs
from tests.conftest import ASTRONAUT_CLICK, png_bytes
from tests.e2e.serve import IsekaiServe, copy_repository

pytestmark = pytest.mark.e2e

CACHE_ENTRIES = 2
EMBEDDING_BYTES = 4 * C.SAM_EMBEDDING_CHANNELS * C.SAM_EMBEDDING_SIZE**2  # float32 [1, 256, 64, 64]
FAIL_AT_STEP = 3
FAILING_UNET = (
    '"""Test-only unet: the exported graph, whose K-th call raises after fail_at (holding K) appears."""'
    '''
from pathlib import Path

from isekai.serving.onnx_model import TritonPythonModel as OnnxModel

MARKER = Path(__file__).with_name("fail_at")


class TritonPythonModel(OnnxModel):
    calls = 0

    def execute(self, requests):
        if MARKER.exists():
            self.calls += 1
            if self.calls >= int(MARKER.read_text()):
                MARKER.unlink()
                self.calls = 0
                raise RuntimeError("injected unet failure (test)")
        return super().execute(requests)
'''
)


@pytest.fixture(scope="module")
def faulty(demo_repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    repository = copy_repository(demo_repository, root / "repository")
    (repository / C.UNET_MODEL / C.MODEL_VERSION / "model.py").write_text(FAILING_UNET)
    config = repository / C.EMBEDDING_CACHE_MODEL / "config.pbtxt"
    text, n = re.subn(r'(key: "cache_entries" value: \{ string_value: )"\d+"', rf'\1"{CACHE_ENTRIES}"',
                      config.read_text())
    assert n == 1, "embedding_cache/config.pbtxt has no cache_entries parameter"
    config.write_text(text)
    serve = IsekaiServe(repository, root / "serve.log", "--grace", "20").start()
    yield serve
    code = serve.terminate()
    assert code == 0, serve.log_tail()


@pytest.fixture(scope="module")
def client(faulty):
    c = IsekaiClient(faulty.grpc_url)
    yield c
    c.close()


def photos(n: int) -> list[bytes]:
    """``n`` distinct photos (different bytes, so different cache keys) of a person-sized blob."""
    out = []
    for i in range(n):
        rgb = np.full((256, 192, 3), 40 + 40 * i, np.uint8)
        rgb[64:224, 64:128] = (200, 120, 90)
        out.append(png_bytes(rgb))
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total / 1024


def test_full_embedding_cache_evicts_and_stays_bounded(faulty, client):
    before = cache_counters(faulty.metrics_url)
    seen = []
    for image in photos(4) * 2:  # every image twice: the second round misses again, its entry was evicted
        client.segment(image, [(96.0, 144.0)])
        counters = cache_counters(faulty.metrics_url)
        seen.append(counters["entries"])
        assert counters["entries"] <= CACHE_ENTRIES
        assert counters["bytes"] == counters["entries"] * EMBEDDING_BYTES
    after = cache_counters(faulty.metrics_url)
    print(f"\ncache: entries per request {seen}, evictions {after['evictions'] - before['evictions']:.0f}, "
          f"misses {after['misses'] - before['misses']:.0f}, hits {after['hits'] - before['hits']:.0f}")
    assert max(seen) == CACHE_ENTRIES
    assert after["evictions"] - before["evictions"] >= 6
    assert after["misses"] - before["misses"] == 8  # least recently used first out: a cycle of 4 never hits
    assert after["hits"] == before["hits"]


def test_unet_raising_mid_loop_fails_that_request_alone(faulty, client, astronaut_png):
    marker = faulty.repository / C.UNET_MODEL / C.MODEL_VERSION / "fail_at"
    client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=8, seed=1)  # the photo's embedding is cached now
    stubs = [s.pid for s in server_stubs(faulty.triton_pid()) if s.model in (C.DIFFUSION_MODEL, C.UNET_MODEL)]
    cache_before, rss_before = cache_counters(faulty.metrics_url), rss_mb(stubs)
    for _ in range(3):
        marker.write_text(str(FAIL_AT_STEP))
        with pytest.raises(InferenceServerException) as failure:
            client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=8, seed=1)  # int(8 * 0.75) = 6 unet calls
        assert failure.value.status() == "StatusCode.INTERNAL"
        assert "unet" in failure.value.message() and "injected unet failure" in failure.value.message()
        assert not marker.exists(), "the failure must have come from the marked call"
        out = client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=8, seed=1)  # the next one is served
        assert out.result != out.background
    cache_after, rss_after = cache_counters(faulty.metrics_url), rss_mb(stubs)
    print(f"\nunet failure: '{failure.value.message()[:160]}'; diffusion+unet stubs RSS {rss_before:.0f} -> "
          f"{rss_after:.0f} MiB over 3 failed + 3 served swaps")
    assert cache_after["entries"] == cache_before["entries"], "a failed request left a cache entry"
    assert cache_after["hits"] - cache_before["hits"] == 6 and cache_after["misses"] == cache_before["misses"]
    assert rss_after - rss_before < 64, "the diffusion or unet stub grew with every failed request"


def test_killed_stub_fails_its_request_and_the_model_comes_back(faulty, client, astronaut_png):
    triton = faulty.triton_pid()
    (victim,) = [s.pid for s in server_stubs(triton) if s.model == C.UNET_MODEL]
    outcome: dict[str, object] = {}

    def long_swap() -> None:
        try:
            outcome["result"] = client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=60, seed=2)
        except InferenceServerException as err:
            outcome["error"] = err

    caller = threading.Thread(target=long_swap)
    caller.start()
    time.sleep(2.0)  # inside the denoising loop (60 steps take far longer on the small checkpoints)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    caller.join(timeout=120)
    error = outcome.get("error")
    assert isinstance(error, InferenceServerException), f"the request in flight did not fail: {outcome}"
    assert error.status() == "StatusCode.INTERNAL" and "unet" in error.message(), error.message()

    # Triton 2.51 neither restarts nor reaps the stub; isekai serve's supervisor reloads the model.
    deadline = time.monotonic() + 60
    while not [s for s in server_stubs(triton) if s.model == C.UNET_MODEL and not s.zombie]:
        assert time.monotonic() < deadline, "no new unet stub: " + faulty.log_tail()
        time.sleep(0.2)
    while True:
        try:
            out = client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=2, seed=3)
            break
        except InferenceServerException as err:  # the reload replaces the instance within a second or two
            assert time.monotonic() < deadline, f"requests keep failing after the reload: {err}"
            time.sleep(0.5)
    recovered = time.monotonic() - killed
    assert out.result != out.background
    assert np.asarray(Image.open(io.BytesIO(out.result))).shape == (512, 512, 3)
    log_text = faulty.log.read_text()
    assert "stub of model 'unet' died" in log_text
    assert "has been a zombie for" in log_text or "has had no live stub for" in log_text, (
        "the log says no reason"
    )
    print(f"\nkill -9 unet stub: in-flight request failed with '{error.message()}'; served again "
          f"{recovered:.1f} s after the kill")
