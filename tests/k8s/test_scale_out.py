"""Scale-out on one machine: two tritonserver replicas of the real isekai repository on loopback ports, and
the thin client's round-robin over them, as it spreads calls over the pods of the headless Service. Every
request succeeds and each replica served its share, read from each replica's own Prometheus metrics.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from isekai import constants as C
from isekai.client.client import IsekaiClient
from isekai.serving.server import ServerOptions, TritonServer, free_port
from tests.conftest import ASTRONAUT_CLICK

pytestmark = pytest.mark.e2e

REPLICAS = 2
REQUESTS = 6


def served(metrics_url: str, model: str) -> int:
    """nv_inference_request_success of ``model`` on one server (0 before its first request)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    pattern = rf'^nv_inference_request_success\{{model="{re.escape(model)}",version="[^"]*"\}} (\S+)$'
    return sum(int(float(m.group(1))) for m in re.finditer(pattern, text, flags=re.MULTILINE))


@pytest.fixture
def replicas(demo_repository, tmp_path):
    servers = [
        TritonServer(
            ServerOptions(
                repository=demo_repository,
                grpc_port=free_port(),
                http_port=free_port(),
                metrics_port=free_port(),
            ),
            log_path=tmp_path / f"replica-{i}.log",
        )
        for i in range(REPLICAS)
    ]
    try:
        for server in servers:  # load side by side, as pods do
            server.start()
        for server in servers:
            server.wait_ready(timeout_s=600)
        yield servers
    finally:
        for server in servers:
            server.stop(grace_s=30)


def test_client_round_robin_spreads_requests_over_replicas(replicas, astronaut_png):
    before = [served(s.metrics_url, C.SEGMENT_MODEL) for s in replicas]
    client = IsekaiClient(",".join(s.grpc_url for s in replicas))
    try:
        assert client.urls == [s.grpc_url for s in replicas]
        results = [client.segment(astronaut_png, [ASTRONAUT_CLICK]) for _ in range(REQUESTS)]
    finally:
        client.close()
    for result in results:
        assert result.mask.startswith(b"\x89PNG")
    # Same image, same click on every replica: the same answer whichever pod served it.
    assert len({r.mask for r in results}) == 1
    # Triton counts a request when it releases it, which may be just after the client has its response.
    deadline = time.monotonic() + 10
    while True:
        counts = [served(s.metrics_url, C.SEGMENT_MODEL) - b for s, b in zip(replicas, before, strict=True)]
        if sum(counts) >= REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(counts) == REQUESTS, f"requests lost or counted twice: {counts}"
    assert counts == [REQUESTS // REPLICAS] * REPLICAS, f"round-robin should alternate replicas: {counts}"
