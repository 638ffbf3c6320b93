"""``isekai serve`` on SIGTERM/SIGINT: readiness goes false and new requests are refused at once, the requests
in flight finish (gRPC and HTTP), the process exits 0 and leaves no stub behind; the grace bounds the drain.

(``tests/k8s/test_entrypoint.py`` covers the container's entrypoint, where tritonserver itself gets SIGTERM.)
"""

from __future__ import annotations

import io
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from isekai.client.client import IsekaiClient
from tests.conftest import ASTRONAUT_CLICK
from tests.e2e.serve import IsekaiServe, still_running

pytestmark = pytest.mark.e2e

LONG_STEPS = 30  # about 10 s per swap on the small checkpoints with two in flight on 2 cores
GRACE_S = 90


def swap_in_thread(url: str, protocol: str, image: bytes, steps: int, outcome: dict) -> threading.Thread:
    def call() -> None:
        client = IsekaiClient(url, protocol=protocol)
        try:
            outcome[protocol] = client.swap(image, [ASTRONAUT_CLICK], steps=steps, seed=5)
        except Exception as err:  # noqa: BLE001 - checked by the test
            outcome[protocol] = err
        finally:
            outcome[f"{protocol}_at"] = time.monotonic()
            client.close()

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def wait_until_in_flight(serve: IsekaiServe, n: int, timeout_s: float = 30) -> None:
    """Until ``n`` requests are inside the diffusion model (so the signal surely lands mid-request)."""
    triton = grpcclient.InferenceServerClient(serve.grpc_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = triton.get_inference_statistics("unet", as_json=True)["model_stats"][0]
        if int(stats.get("execution_count", 0)) >= n:
            triton.close()
            return
        time.sleep(0.1)
    raise AssertionError("the long requests never reached the unet")


def test_sigterm_drains_in_flight_requests_and_exits_zero(demo_repository, astronaut_png, tmp_path):
    serve = IsekaiServe(demo_repository, tmp_path / "serve.log", "--grace", str(GRACE_S)).start()
    outcome: dict = {}
    try:
        callers = [swap_in_thread(serve.grpc_url, "grpc", astronaut_png, LONG_STEPS, outcome),
                   swap_in_thread(serve.http_url, "http", astronaut_png, LONG_STEPS, outcome)]
        wait_until_in_flight(serve, 2)
        processes = serve.processes()
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        probe = grpcclient.InferenceServerClient(serve.grpc_url)
        while serve.ready() or probe.is_server_ready():
            assert time.monotonic() - signalled < 5, "readiness still true 5 s after SIGTERM"
            time.sleep(0.05)
        not_ready = time.monotonic()
        with pytest.raises(InferenceServerException) as refused:
            IsekaiClient(serve.grpc_url).segment(astronaut_png, [ASTRONAUT_CLICK])
        probe.close()
        code = serve.process.wait(timeout=GRACE_S + 30)
        exited = time.monotonic()
        left = still_running(processes)  # before the finally's kill could hide them
        for caller in callers:
            caller.join(timeout=30)
    finally:
        serve.kill()
    print(f"\nSIGTERM: not ready after {not_ready - signalled:.2f} s; new request refused with "
          f"{refused.value.status()} '{refused.value.message()}'; in-flight responses after "
          f"{outcome['grpc_at'] - signalled:.1f} s (gRPC) and {outcome['http_at'] - signalled:.1f} s (HTTP); "
          f"exit {code} after {exited - signalled:.1f} s")
    for protocol in ("grpc", "http"):
        result = outcome.get(protocol)
        assert not isinstance(result, Exception), f"the in-flight {protocol} request was lost: {result}"
        assert np.asarray(Image.open(io.BytesIO(result.result))).shape == (512, 512, 3)  # complete, decodable
        assert outcome[f"{protocol}_at"] > not_ready, "readiness must go false before the drain ends"
    assert code == 0, serve.log_tail()
    assert len(processes) > 10 and not left, f"tritonserver or stubs outlived isekai serve: {left}"


def test_sigint_grace_bounds_the_drain(demo_repository, astronaut_png, tmp_path):
    """A request longer than the grace is cut off, and the server still goes, with every stub."""
    grace = 3
    serve = IsekaiServe(demo_repository, tmp_path / "serve.log", "--grace", str(grace)).start()
    outcome: dict = {}
    try:
        caller = swap_in_thread(serve.grpc_url, "grpc", astronaut_png, 100, outcome)
        wait_until_in_flight(serve, 1)
        processes = serve.processes()
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGINT)
        code = serve.process.wait(timeout=60)
        took = time.monotonic() - signalled
        left = still_running(processes)
        caller.join(timeout=30)
    finally:
        serve.kill()
    print(f"\nSIGINT with --grace {grace}: exit {code} after {took:.1f} s; the 100-step request: "
          f"{outcome.get('grpc')!s:.120}")
    assert code == 1, "a drain cut short by the grace is not a clean exit"
    assert took < grace + 20  # the grace, plus at most SHUTDOWN_UNLOAD_S for Triton to unload
    assert isinstance(outcome.get("grpc"), Exception)
    assert not left, f"tritonserver or stubs outlived isekai serve: {left}"
