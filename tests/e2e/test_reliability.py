"""Reliability of a running server: whose fault an error is, embeddings after a re-export, stuck stages, a
reaped instance, overload.

One ``isekai serve`` (the real command, its supervisor, an admin key) on a private copy of the
small-checkpoint repository with two test-only changes: a model ``ort_fault`` (the production onnxruntime
adapter on a tiny graph that onnxruntime refuses or fails to run for real: tests/ort_fault_graph.py), and a
``vae_decoder`` whose ``execute`` hangs while a marker file exists. The tests run in file order and share it;
the re-export test leaves SAM re-exported for the ones after it, which do not depend on SAM's weights.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from isekai import constants as C
from isekai.client.client import IsekaiClient
from isekai.client.stats import cache_counters
from isekai.serving.repository import RepositoryAPI
from isekai.serving.stubs import server_stubs
from tests.conftest import ASTRONAUT_CLICK, ROOT, png_bytes
from tests.e2e.serve import IsekaiServe, copy_repository
from tests.ort_fault_graph import HUGE, write_fault_graph

pytestmark = pytest.mark.e2e

ADMIN_KEY = "reliability-test"
FAULT_MODEL = "ort_fault"
FAULT_CONFIG = f'''name: "{FAULT_MODEL}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "x" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "n" data_type: TYPE_INT64 dims: [ 1 ] }}
]
output [
  {{ name: "y" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "total" data_type: TYPE_FP32 dims: [ 1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "cpu_mem_arena" value: {{ string_value: "false" }} }}
'''
STUCK_MARKER = "stuck"
STUCK_VAE_DECODER = f'''"""Test-only vae_decoder: the exported graph; hangs while {STUCK_MARKER!r} exists."""
import time
from pathlib import Path

from isekai.serving.onnx_model import TritonPythonModel as OnnxModel

MARKER = Path(__file__).with_name({STUCK_MARKER!r})


class TritonPythonModel(OnnxModel):
    def execute(self, requests):
        while MARKER.exists():
            time.sleep(0.1)
        return super().execute(requests)
'''
# The least request timeout the stuck-stage test gives its swap (seconds): a 2-step swap here takes ~2 s.
STUCK_TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def served(demo_repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    repository = copy_repository(demo_repository, root / "repository")
    fault = repository / FAULT_MODEL
    write_fault_graph(fault / C.MODEL_VERSION / C.ONNX_FILENAME)
    (fault / "config.pbtxt").write_text(FAULT_CONFIG)
    adapter = repository / C.SAM_ENCODER_MODEL / C.MODEL_VERSION / "model.py"  # the production adapter
    (fault / C.MODEL_VERSION / "model.py").write_text(adapter.read_text())
    (repository / C.VAE_DECODER_MODEL / C.MODEL_VERSION / "model.py").write_text(STUCK_VAE_DECODER)
    serve = IsekaiServe(repository, root / "serve.log", "--grace", "20", "--admin-key", ADMIN_KEY).start()
    yield serve
    (repository / C.VAE_DECODER_MODEL / C.MODEL_VERSION / STUCK_MARKER).unlink(missing_ok=True)
    code = serve.terminate()
    assert code == 0, serve.log_tail()


@pytest.fixture(scope="module")
def client(served):
    c = IsekaiClient(served.grpc_url)
    yield c
    c.close()


def unique_photo(tag: int) -> tuple[np.ndarray, bytes]:
    """The astronaut with one pixel changed: bytes no other test sent (a cold cache key)."""
    from skimage import data  # noqa: PLC0415 - as in tests/conftest.py

    rgb = data.astronaut().copy()
    rgb[0, 0] = (tag % 251, 17, 23)
    return rgb, png_bytes(rgb)


# -----------------------------------------------------------------------------------------------------------
# 1. Whose fault: onnxruntime refusing a feed is the caller's, onnxruntime failing to run is the server's
# -----------------------------------------------------------------------------------------------------------
def infer_fault(url: str, x: np.ndarray, n: int, request_id: str):
    with grpcclient.InferenceServerClient(url) as triton:
        inputs = [grpcclient.InferInput("x", list(x.shape), "FP32"), grpcclient.InferInput("n", [1], "INT64")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(np.array([n], np.int64))
        return triton.infer(FAULT_MODEL, inputs, request_id=request_id, client_timeout=60)


def test_onnxruntime_failing_to_run_is_internal_and_logged_with_the_request_id(served):
    with pytest.raises(InferenceServerException) as failure:
        infer_fault(served.grpc_url, np.ones(3, np.float32), HUGE, "oom-1")  # asks onnxruntime for 512 TiB
    message = failure.value.message()
    assert failure.value.status() == "StatusCode.INTERNAL", message
    assert f"{FAULT_MODEL}: running the graph failed" in message and "ConstantOfShape" in message
    deadline = time.monotonic() + 10
    while f"{FAULT_MODEL}: run failed for requests ['oom-1']" not in served.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, (
            "the failure was not logged with its request id:\n" + served.log_tail()
        )
        time.sleep(0.2)

    with pytest.raises(InferenceServerException) as refused:
        infer_fault(
            served.grpc_url, np.ones(5, np.float32), 4, "bad-shape-1"
        )  # the config allows it, the graph not
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value.message()
    assert f"{FAULT_MODEL}: the graph refused the inputs" in refused.value.message()
    assert "Got invalid dimensions for input: x" in refused.value.message()
    assert "['bad-shape-1']" not in served.log.read_text(errors="replace"), (
        "a caller's error was logged as ours"
    )

    out = infer_fault(served.grpc_url, np.ones(3, np.float32), 4, "good-1")  # the model still serves
    assert out.as_numpy("y").tolist() == [2.0, 2.0, 2.0] and out.as_numpy("total").tolist() == [4.0]
    print(f"\nort failure: INTERNAL '{message[:140]}...'; bad shape: INVALID_ARGUMENT")


# -----------------------------------------------------------------------------------------------------------
# 2. SAM re-exported and reloaded: the old encoder's embeddings are never served with the new decoder
# -----------------------------------------------------------------------------------------------------------
def reference_predictor(checkpoint):
    import importlib.util  # noqa: PLC0415

    from isekai.export.sam import load_sam  # noqa: PLC0415 - torch, only here

    path = ROOT / "tests" / "reference_sam.py"
    spec = importlib.util.spec_from_file_location("reference_sam", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    return reference.SamPredictor(load_sam(checkpoint))


def reference_low_res(predictor, rgb: np.ndarray, click) -> np.ndarray:
    """SamPredictor's low-res logits for one click, as the exported decoder picks them (best of multimask)."""
    predictor.set_image(rgb)
    _, scores, low_res = predictor.predict(
        point_coords=np.asarray([click], np.float64),
        point_labels=np.asarray([1]),
        multimask_output=True,
        return_logits=True,
    )
    return low_res[int(np.argmax(scores))]


def test_reexported_and_reloaded_sam_serves_the_fresh_encoders_mask(served, client, tmp_path):
    from isekai.export.make_sam import make_sam_checkpoint  # noqa: PLC0415 - torch, only here
    from isekai.export.sam import export_sam  # noqa: PLC0415

    rgb, photo = unique_photo(1)
    before = client.segment(photo, [ASTRONAUT_CLICK])  # encoded by the demo SAM and cached
    assert np.array_equal(client.segment(photo, [ASTRONAUT_CLICK]).low_res_mask, before.low_res_mask)

    checkpoint = make_sam_checkpoint(tmp_path / "sam_tiny_other.pth", "tiny", seed=1)
    export_sam(checkpoint, "auto", repository=served.repository)

    # Re-exported, not reloaded: the loaded (old) encoder and decoder still serve together, and what the old
    # encoder computes now is not cached under the new graph's key.
    c0 = cache_counters(served.metrics_url)
    between = client.segment(photo, [ASTRONAUT_CLICK])
    c1 = cache_counters(served.metrics_url)
    np.testing.assert_allclose(between.low_res_mask, before.low_res_mask, atol=1e-4)
    assert c1["misses"] - c0["misses"] == 1 and c1["entries"] == c0["entries"], (c0, c1)
    assert f"{C.SAM_ENCODER_MODEL} {C.GRAPH_MISMATCH}" in served.log.read_text(errors="replace")

    repository = RepositoryAPI(served.http_url, C.ADMIN_KEY_HEADER, ADMIN_KEY)
    for model in (C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL):
        repository.reload(model)
    after = client.segment(photo, [ASTRONAUT_CLICK])
    c2 = cache_counters(served.metrics_url)
    want = reference_low_res(reference_predictor(checkpoint), rgb, ASTRONAUT_CLICK)
    np.testing.assert_allclose(after.low_res_mask[0, 0], want, atol=1e-3)
    # the old encoder's logits are far from the fresh reference (the tolerance above is 1e-3)
    assert np.abs(before.low_res_mask[0, 0] - want).max() > 0.05, (
        "the two SAMs agree: the test proves nothing"
    )
    assert c2["misses"] - c1["misses"] == 1, "the reloaded encoder's first call on the photo must miss"
    assert np.array_equal(client.segment(photo, [ASTRONAUT_CLICK]).low_res_mask, after.low_res_mask)
    assert cache_counters(served.metrics_url)["hits"] - c2["hits"] == 1


# -----------------------------------------------------------------------------------------------------------
# 5. A stuck stage fails its request with a message, within the request's own timeout
# -----------------------------------------------------------------------------------------------------------
def test_a_stuck_stage_fails_its_request_within_the_requests_timeout(served, client, astronaut_png):
    marker = served.repository / C.VAE_DECODER_MODEL / C.MODEL_VERSION / STUCK_MARKER
    client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=2, seed=1)  # the photo's embedding is cached now
    started = time.monotonic()
    client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=2, seed=1)
    # the timeout: well above what the swap takes when nothing is stuck, on this machine now
    timeout_s = max(STUCK_TIMEOUT_S, 4 * (time.monotonic() - started))
    timed = IsekaiClient(served.grpc_url, timeout_s=timeout_s, attempts=1)
    try:
        marker.touch()
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as failure:
            timed.swap(astronaut_png, [ASTRONAUT_CLICK], steps=2, seed=1)
        took = time.monotonic() - started
    finally:
        marker.unlink(missing_ok=True)
    message = failure.value.message()
    assert failure.value.status() == "StatusCode.INTERNAL", message
    assert f"{C.VAE_DECODER_MODEL}: no answer within" in message, message
    assert "the request's timeout" in message, message
    assert took < timeout_s + C.CLIENT_DEADLINE_MARGIN_S, f"the server's own error came after {took:.1f} s"
    out = timed.swap(astronaut_png, [ASTRONAUT_CLICK], steps=2, seed=1)  # unstuck: served again
    assert out.result != out.background
    timed.close()
    print(f"\nstuck vae_decoder: failed after {took:.1f} s (timeout {timeout_s:.1f} s): '{message[:150]}'")


# -----------------------------------------------------------------------------------------------------------
# 6. One of diffusion's two instances dies and Triton reaps it: the supervisor notices and reloads
# -----------------------------------------------------------------------------------------------------------
def test_a_reaped_diffusion_instance_is_detected_and_reloaded(served, client, astronaut_png):
    triton = served.triton_pid()
    live = {s.instance: s.pid for s in server_stubs(triton) if s.model == C.DIFFUSION_MODEL and not s.zombie}
    assert sorted(live) == ["diffusion_0_0", "diffusion_0_1"], live
    os.kill(live["diffusion_0_1"], signal.SIGKILL)
    killed = time.monotonic()
    outcomes: list[str] = []

    def swap() -> None:  # several at once: one goes to the dead instance, whose health check reaps it
        try:
            client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=2, seed=4)
            outcomes.append("ok")
        except InferenceServerException as err:
            outcomes.append(err.message())

    threads = [threading.Thread(target=swap) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    reaped = not any(s.pid == live["diffusion_0_1"] for s in server_stubs(triton))
    outcomes_at_kill = [o if o == "ok" else o[:80] for o in outcomes]

    deadline = killed + 120  # noticed after 5 s, then a reload of ~20 s on 2 busy cores
    while "model 'diffusion' reloaded with a new stub" not in served.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, (
            "the dead diffusion instance was not noticed:\n" + served.log_tail()
        )
        time.sleep(0.2)
    log_text = served.log.read_text(errors="replace")
    # the new instances' stubs (the old instance's stub may linger while its last request finishes)
    while {
        s.instance
        for s in server_stubs(triton)
        if s.model == C.DIFFUSION_MODEL
        and not s.zombie
        and s.pid not in live.values()
        and s.instance != C.DIFFUSION_MODEL  # a config stub
    } != {"diffusion_0_0", "diffusion_0_1"}:
        assert time.monotonic() < deadline, "diffusion did not get its two instances back"
        time.sleep(0.2)
    results = []
    for seed in (5, 6, 7):  # several in a row, and two at once: both instances serve again
        results.append(client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=2, seed=seed))
    threads = [threading.Thread(target=swap) for _ in range(2)]
    outcomes.clear()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert outcomes == ["ok", "ok"], outcomes
    assert all(r.result != r.background for r in results)
    print(
        f"\nkilled diffusion_0_1 (reaped by Triton: {reaped}; swaps meanwhile: {outcomes_at_kill}); noticed "
        f"and reloaded, served again "
        f"{time.monotonic() - killed:.1f} s after the kill"
    )
    if reaped:
        assert "instance diffusion_0_1 is loaded but has had no live stub" in log_text, log_text[-2000:]


# -----------------------------------------------------------------------------------------------------------
# 4. Ten times the swaps the server can run: bounded queues refuse the rest at once, nothing is lost or
# corrupted
# -----------------------------------------------------------------------------------------------------------
OVERLOAD_CLIENTS = 20  # diffusion runs 2 swaps at once: 10x
OVERLOAD_ATTEMPTS = 10  # the retrying phase's IsekaiClient(attempts=...): backoff up to 10 s between tries
OVERLOAD_STEPS = 2
MAX_REFUSAL_S = 15.0  # a refusal comes after the cheap steps before the full queue, never after a whole swap
MAX_RSS_GROWTH_MIB = 256  # what a second overload round may add to the first one's peak (allocator noise)


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except OSError:
            continue
    return total / 1024


def test_ten_times_capacity_is_refused_fast_and_nothing_is_lost_or_corrupted(served, astronaut_png):
    """diffusion's queue cannot bound itself on Triton 2.51 (core PR #466): prepare refuses a swap while
    DIFFUSION_MAX_WAITING wait there (ensemble/admission.py)."""
    triton = served.triton_pid()
    reference = IsekaiClient(served.grpc_url).swap(
        astronaut_png, [ASTRONAUT_CLICK], steps=OVERLOAD_STEPS, seed=9
    )
    processes = [triton] + [s.pid for s in server_stubs(triton) if not s.zombie]
    idle_rss = rss_mib(processes)
    peak = {"rss": idle_rss}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.25):
            peak["rss"] = max(peak["rss"], rss_mib(processes))

    answered, refused, other = [], [], []
    lock = threading.Lock()

    def one_client(attempts: int, rounds: int) -> None:
        client = IsekaiClient(served.grpc_url, attempts=attempts, timeout_s=300)
        for _ in range(rounds):
            started = time.monotonic()
            try:
                out = client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=OVERLOAD_STEPS, seed=9)
                with lock:
                    answered.append(
                        (
                            time.monotonic() - started,
                            out.result == reference.result
                            and out.mask == reference.mask
                            and out.background == reference.background,
                        )
                    )
            except InferenceServerException as err:
                took = time.monotonic() - started
                with lock:
                    if err.status() == "StatusCode.UNAVAILABLE" and "the server is busy" in err.message():
                        refused.append((took, err.message()))
                    else:
                        other.append(f"{err.status()}: {err.message()}")
        client.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        # without retries: how the refusals look
        clients = [threading.Thread(target=one_client, args=(1, 1)) for _ in range(OVERLOAD_CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=600)
        no_retry = (len(answered), len(refused))
        first_peak = peak["rss"]
        # with IsekaiClient's retries (backoff): every swap is answered in the end
        answered_before = len(answered)
        clients = [
            threading.Thread(target=one_client, args=(OVERLOAD_ATTEMPTS, 1)) for _ in range(OVERLOAD_CLIENTS)
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=600)
    finally:
        sampling.set()
        sampler.join()
    took = time.monotonic() - started
    refusal_s = sorted(t for t, _ in refused)
    print(
        f"\n10x overload ({OVERLOAD_CLIENTS} clients): without retries {no_retry[0]} answered, {no_retry[1]} "
        f"refused (refusal p50 {statistics.median(refusal_s) if refusal_s else 0:.2f} s, max "
        f"{max(refusal_s, default=0):.2f} s); with retries "
        f"{len(answered) - answered_before}/{OVERLOAD_CLIENTS} "
        f"answered; {took:.0f} s in all; server RSS {idle_rss:.0f} MiB idle, peak {first_peak:.0f} MiB in "
        f"the first round and {peak['rss']:.0f} MiB after the second"
    )
    if refused:
        print(f"refusal: '{refused[0][1][:200]}'")
    assert not other, other[:3]
    assert all(same for _, same in answered), "an answer differs from the same request's answer when idle"
    assert no_retry[1] > 0, "10x the capacity was never refused: the queues are not bounded"
    assert max(refusal_s) <= MAX_REFUSAL_S, refusal_s[-5:]
    assert len(answered) - answered_before == OVERLOAD_CLIENTS, "a retried swap was lost"
    # bounded: the second round (as many swaps again, retried) does not raise the peak of the first
    assert peak["rss"] - first_peak < MAX_RSS_GROWTH_MIB, (idle_rss, first_peak, peak["rss"])
    assert first_peak - idle_rss < 4 * 1024, (
        f"the server took {first_peak - idle_rss:.0f} MiB more under overload"
    )
