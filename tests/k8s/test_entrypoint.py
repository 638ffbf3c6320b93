"""k8s/triton-entrypoint.sh, the image's entrypoint, run for real: it starts ``isekai serve`` (the embedded
Triton 2.51 build, the NGC 24.10 image's version) with the profile the overlays set; SIGTERM drains a request
that is making BLS calls over gRPC (what plain tritonserver lost), and a killed stub's model is reloaded.

The test points the entrypoint at loopback and free ports through its environment, as the overlays could.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from isekai.serving.server import ServerOptions, TritonServer, free_port
from isekai.serving.stubs import repository_stubs
from tests.conftest import ROOT
from tests.k8s.tiny_repository import ECHO, PROFILE_OUTPUT, infer_once, write_tiny_repository

pytestmark = pytest.mark.e2e

ENTRYPOINT = ROOT / "k8s" / "triton-entrypoint.sh"
LONGEST_REQUEST_S = 10


def _start(repository: Path, profile: str | None, log: Path) -> TritonServer:
    options = ServerOptions(
        repository=repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()
    )
    env = dict(os.environ)
    env.update(
        MODEL_REPOSITORY=str(repository),
        ISEKAI=str(Path(sys.executable).parent / "isekai"),
        ISEKAI_HOST=options.host,
        ISEKAI_HTTP_PORT=str(options.http_port),
        ISEKAI_GRPC_PORT=str(options.grpc_port),
        ISEKAI_METRICS_PORT=str(options.metrics_port),
        ISEKAI_LONGEST_REQUEST_S=str(LONGEST_REQUEST_S),
    )
    env.pop("ISEKAI_PROFILE", None)
    if profile is not None:
        env["ISEKAI_PROFILE"] = profile
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["sh", str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = TritonServer(options, log_path=log)
    server.process = process  # wait_ready/stop work on the entrypoint's process (it exec'd isekai serve)
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


def test_sigterm_drains_a_grpc_request_in_the_middle_of_its_bls_calls(tmp_path):
    """The kubelet's SIGTERM reaches isekai serve (exec'd by the entrypoint): the request in flight over gRPC
    makes its remaining BLS calls and its response arrives; the server exits 0 and leaves no stub behind.

    Plain tritonserver 2.51 refused the remaining BLS calls with "Server not ready" and the client got
    INTERNAL."""
    repository = write_tiny_repository(tmp_path / "repository", sleep_ms=3000, bls=True)
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
        time.sleep(0.5)  # inside the sleeper, before its first BLS call
        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        code = server.process.wait(timeout=LONGEST_REQUEST_S + 30)
        caller.join(timeout=30)
    finally:
        server.stop(grace_s=5)
    log = (tmp_path / "triton.log").read_text(errors="replace")
    assert outcome.get("y") == 7.0, f"the in-flight request was lost: {outcome}\n{log[-3000:]}"
    assert code == 0, log[-3000:]
    assert time.monotonic() - started < LONGEST_REQUEST_S + 30
    assert repository_stubs(repository) == [], "a Python-backend stub outlived the server"


def test_a_killed_stub_is_reloaded_and_the_pod_serves_again(tmp_path):
    """The OOM killer takes a stub: isekai serve reloads its model, so the pod needs no restart."""
    repository = write_tiny_repository(tmp_path / "repository", sleep_ms=30, bls=True)
    server = _start(repository, "", tmp_path / "triton.log")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert infer_once(client, 2.0).as_numpy("y")[0] == 2.0
        (victim,) = [s.pid for s in repository_stubs(repository) if s.model == ECHO]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            try:
                assert infer_once(client, 5.0).as_numpy("y")[0] == 5.0
                break
            except Exception:  # noqa: BLE001 - the model is being reloaded
                assert time.monotonic() - killed < 60, "the killed stub's model never came back"
                time.sleep(0.5)
        assert [s for s in repository_stubs(repository) if s.model == ECHO and s.pid != victim]
    finally:
        client.close()
        code = server.stop(grace_s=30)
    log = (tmp_path / "triton.log").read_text(errors="replace")
    assert f"model '{ECHO}' reloaded" in log, log[-3000:]
    assert code == 0
