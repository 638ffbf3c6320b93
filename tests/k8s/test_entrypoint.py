"""k8s/triton-entrypoint.sh, the image's entrypoint, run for real: it starts tritonserver (the embedded 2.51
build, the NGC 24.10 image's version) with the profile the overlays set, and SIGTERM drains and exits.

The test appends loopback addresses and free ports, as a user may append flags to the container's args: the
entrypoint passes its own flags first and Triton keeps the last value of a repeated flag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from isekai.serving.server import ServerOptions, TritonServer, find_tritonserver, free_port
from tests.conftest import ROOT
from tests.k8s.tiny_repository import PROFILE_OUTPUT, infer_once, write_tiny_repository

pytestmark = pytest.mark.e2e

ENTRYPOINT = ROOT / "k8s" / "triton-entrypoint.sh"
EXIT_TIMEOUT_S = 5


def _start(repository: Path, profile: str | None, log: Path):
    install = find_tritonserver()
    options = ServerOptions(
        repository=repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()
    )
    env = options.environment(install)  # the stub's python and the wheel's libraries, as `isekai serve` sets
    env.update(
        MODEL_REPOSITORY=str(repository),
        TRITONSERVER=str(install.binary),
        ISEKAI_EXIT_TIMEOUT_S=str(EXIT_TIMEOUT_S),
        ISEKAI_LONGEST_REQUEST_S="5",
    )
    env.pop("ISEKAI_PROFILE", None)
    if profile is not None:
        env["ISEKAI_PROFILE"] = profile
    local = [
        f"--backend-directory={install.backend_dir}",
        f"--http-address={options.host}",
        f"--http-port={options.http_port}",
        f"--grpc-address={options.host}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-address={options.host}",
        f"--metrics-port={options.metrics_port}",
        "--allow-gpu-metrics=false",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT), *local],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = TritonServer(options, log_path=log)
    server.process = process  # wait_ready/stop work on the entrypoint's process (it exec'd tritonserver)
    try:
        server.wait_ready(timeout_s=120)
    except BaseException:
        server.stop(grace_s=5)
        raise
    return server


@pytest.mark.parametrize(("profile", "loaded"), [(None, "gpu"), ("gpu", "gpu"), ("", "default")])
def test_entrypoint_serves_the_profile_the_overlay_sets(tmp_path, profile, loaded):
    repository = write_tiny_repository(tmp_path / "repository")
    server = _start(repository, profile, tmp_path / "triton.log")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        result = infer_once(client, 3.0)
        assert result.as_numpy(PROFILE_OUTPUT)[0].decode() == loaded
        assert result.as_numpy("y")[0] == 3.0
        client.close()
        with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
            assert b"nv_inference_queue_duration_us" in r.read()
    finally:
        code = server.stop(grace_s=30)
    assert code == 0, f"tritonserver exited {code}; see {tmp_path / 'triton.log'}"


def test_sigterm_drains_the_in_flight_request_and_exits_zero(tmp_path):
    """The kubelet's SIGTERM reaches tritonserver (exec'd as the entrypoint's process): it finishes the
    request in flight and exits 0 within the exit timeout."""
    repository = write_tiny_repository(tmp_path / "repository", sleep_ms=1500)
    server = _start(repository, "", tmp_path / "triton.log")
    outcome: dict[str, object] = {}

    def call() -> None:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            outcome["y"] = float(infer_once(client, 7.0).as_numpy("y")[0])
        except Exception as err:  # noqa: BLE001 - reported below
            outcome["error"] = err
        finally:
            client.close()

    caller = threading.Thread(target=call)
    try:
        caller.start()
        time.sleep(0.5)  # the request is inside the sleeper now
        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        code = server.process.wait(timeout=EXIT_TIMEOUT_S + 20)
        caller.join(timeout=30)
    finally:
        server.stop(grace_s=5)
    assert outcome.get("y") == 7.0, f"the in-flight request was lost: {outcome}"
    assert code == 0
    assert time.monotonic() - started < EXIT_TIMEOUT_S + 20
