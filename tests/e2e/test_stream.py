"""isekai_stream end to end over gRPC streaming: progress, the same bytes as isekai, bad requests,
cancellation.

The UNet's execution count in Triton's statistics proves that a cancelled or abandoned swap stops its work.
"""

from __future__ import annotations

import io
import queue
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from isekai import constants as C
from isekai.client import api
from isekai.client.client import SwapProgress, SwapResult
from isekai.client.stats import model_stats
from isekai.serving.ensemble_steps import EnsemblePlan
from tests.conftest import ASTRONAUT_CLICK, ROOT
from tests.e2e.serve import ISEKAI

pytestmark = pytest.mark.e2e

OPTIONS = {"steps": 4, "seed": 5}  # int(4 * 0.75) = 3 UNet steps
LONG = {"steps": C.MAX_STEPS, "strength": 1.0, "seed": 1}  # 100 UNet steps: time to cancel in the middle


@pytest.fixture(scope="module")
def triton(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def unet_executions(triton) -> int:
    return model_stats(triton)[C.UNET_MODEL].executions


def settled_unet_executions(triton, quiet_s: float = 3.0, timeout_s: float = 60.0) -> int:
    """The unet's execution count once it has not moved for ``quiet_s`` seconds: longer than one tiny UNet
    call takes on a loaded 2-core host (with 1 s a call still running was once taken for a settled count)."""
    deadline = time.monotonic() + timeout_s
    last, since = unet_executions(triton), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = unet_executions(triton)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"the unet kept running for {timeout_s:.0f} s")


def test_progress_events_then_the_bytes_isekai_returns(client, astronaut_png):
    events = list(client.swap_stream(astronaut_png, [ASTRONAUT_CLICK], **OPTIONS))
    direct = client.swap(astronaut_png, [ASTRONAUT_CLICK], **OPTIONS)

    *progress, last = events
    assert isinstance(last, SwapResult) and all(isinstance(e, SwapProgress) for e in progress)
    assert (last.result, last.mask, last.background) == (direct.result, direct.mask, direct.background)
    assert last.score == direct.score
    values = [e.progress for e in progress]
    assert values[0] == 0.0 and progress[0].stage == C.STREAM_STAGE_QUEUED
    assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values), values
    stages = [e.stage for e in progress]
    assert set(stages) - {C.STREAM_STAGE_QUEUED} == {s.model for s in EnsemblePlan.load(
        ROOT / "model_repository" / C.ENSEMBLE_MODEL / "config.pbtxt").steps}, "every isekai step is reported"
    unet_steps = int(OPTIONS["steps"] * C.DEFAULT_STRENGTH)
    loop = [e for e in progress if e.stage == C.DIFFUSION_MODEL]
    assert len({e.progress for e in loop}) >= unet_steps, "at least one progress response per UNet step"
    previews = [e.preview for e in progress if e.preview]
    assert previews, "no preview of the character"
    preview = Image.open(io.BytesIO(previews[-1]))
    assert preview.format == "PNG" and preview.mode == "RGB" and max(preview.size) == C.SD_NATIVE_SIZE // 8


def test_bad_request_gets_one_error_and_the_same_stream_serves_the_next(triton, astronaut_png):
    responses: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        def send(request_id: str, steps: int) -> None:
            tensors = {
                api.IMAGE: np.array([astronaut_png], dtype=np.object_),
                api.POINTS: np.array([ASTRONAUT_CLICK], dtype=np.float32),
                api.LABELS: np.array([1], dtype=np.int32),
                api.STEPS: np.array([steps], dtype=np.int32),
            }
            inputs = []
            for name, value in tensors.items():
                inputs.append(grpcclient.InferInput(name, list(value.shape), api.DTYPES[name]))
                inputs[-1].set_data_from_numpy(value)
            triton.async_stream_infer(api.STREAM_MODEL, inputs, request_id=request_id,
                                      enable_empty_final_response=True)

        send("bad", 0)
        result, error = responses.get(timeout=60)
        assert result is None and error is not None, "a bad request must be answered by an error"
        # A stream carries an error's message, not its code: isekai_stream names the code first.
        assert error.message().startswith("INVALID_ARGUMENT: steps "), error.message()
        send("good", 2)
        got = []
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, f"one error per bad request, and the next request succeeds: {error}"
            response = result.get_response()
            assert response.id == "good"
            got.append({o.name for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                break
        assert set(api.SWAP_OUTPUTS) <= got[-1], got[-1]
        assert all({api.STAGE, api.PROGRESS} <= names for names in got)
    finally:
        triton.stop_stream()


def test_client_raises_a_bad_request_as_invalid_argument(client, astronaut_png):
    with pytest.raises(InferenceServerException) as err:
        client.swap_stream(astronaut_png, [(5000.0, 10.0)], steps=2).result()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.value.message().startswith("points[0] = (5000, 10) is outside the 512x512 image"), err.value


def test_cancel_stops_the_unet_loop(client, triton, astronaut_png):
    before = settled_unet_executions(triton)
    stream = client.swap_stream(astronaut_png, [ASTRONAUT_CLICK], **LONG)
    seen = 0
    for event in stream:
        assert isinstance(event, SwapProgress)
        if event.stage == C.DIFFUSION_MODEL:
            seen += 1
            if seen == 3:
                stream.cancel()
    assert stream.cancelled and seen >= 3
    after = settled_unet_executions(triton)
    assert after - before < LONG["steps"] // 2, f"{after - before} UNet executions after the cancel at step 3"
    time.sleep(3.0)
    assert unet_executions(triton) == after, "the unet still runs for a cancelled swap"


CLIENT_THAT_DIES = textwrap.dedent("""
    import sys
    from isekai.client.client import IsekaiClient
    url, photo, x, y = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    client = IsekaiClient(url)
    for event in client.swap_stream(open(photo, "rb").read(), [(x, y)], steps=100, strength=1.0, seed=2):
        print(event.stage, flush=True)
""")


def test_a_client_that_goes_away_stops_the_unet_loop(server, triton, astronaut_png, tmp_path):
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(astronaut_png)
    before = settled_unet_executions(triton)
    args = [server.grpc_url, str(photo), str(ASTRONAUT_CLICK[0]), str(ASTRONAUT_CLICK[1])]
    child = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_DIES, *args], stdout=subprocess.PIPE,
                             text=True)
    try:
        diffusion = 0
        for line in child.stdout:
            diffusion += line.strip() == C.DIFFUSION_MODEL
            if diffusion == 2:
                break
        assert diffusion == 2, "the client saw no UNet step"
    finally:
        child.kill()  # no cancel, no goodbye: the connection just goes
        child.wait()
    after = settled_unet_executions(triton)
    assert after - before < LONG["steps"] // 2, f"{after - before} UNet executions for an abandoned swap"


def test_isekai_run_draws_a_progress_bar(server, astronaut_png, tmp_path):
    photo, out = tmp_path / "astronaut.png", tmp_path / "out.png"
    photo.write_bytes(astronaut_png)
    run = subprocess.run(
        [str(ISEKAI), "run", str(photo), "--click", "200,300", "--steps", "2", "--output", str(out),
         "--url", server.grpc_url],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "diffusion" in run.stderr and "100% done" in run.stderr, run.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
