"""What ``isekai serve`` exposes: loopback only unless ``--host``; the model-repository, trace and logging
APIs closed by default, and open only to callers sending ``--admin-key`` when it is given."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from isekai import constants as C
from isekai.client.client import IsekaiClient
from tests.conftest import ASTRONAUT_CLICK
from tests.e2e.serve import IsekaiServe

pytestmark = pytest.mark.e2e

ADMIN_KEY = "s3cret-for-tests"
GRPC_KEY = {C.GRPC_RESTRICTED_HEADER_PREFIX + C.ADMIN_KEY_HEADER: ADMIN_KEY}
HTTP_KEY = {C.ADMIN_KEY_HEADER: ADMIN_KEY}


@pytest.fixture(scope="module")
def default_serve(demo_repository, tmp_path_factory):
    s = IsekaiServe(demo_repository, tmp_path_factory.mktemp("exposure") / "default.log").start()
    yield s
    assert s.terminate() == 0, s.log_tail()


@pytest.fixture(scope="module")
def keyed_serve(demo_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("exposure") / "keyed.log"
    s = IsekaiServe(demo_repository, log, "--admin-key", ADMIN_KEY).start()
    yield s
    assert s.terminate() == 0, s.log_tail()


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (IPv4 and IPv6), from /proc/net."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc/net prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(socket.inet_ntop(family, raw))
            found.add(str(getattr(address, "ipv4_mapped", None) or address))  # gRPC: ::ffff:127.0.0.1
    return found


def test_listens_on_loopback_only_by_default(default_serve):
    cmdline = Path(f"/proc/{default_serve.triton}/cmdline").read_bytes().split(b"\0")
    for flag in ("grpc", "http", "metrics"):
        assert f"--{flag}-address=127.0.0.1".encode() in cmdline
    for port in (default_serve.grpc_port, default_serve.http_port, default_serve.metrics_port):
        assert listening_addresses(port) == {"127.0.0.1"}, f"port {port}"


def repository_calls_refused(grpc_url: str, http_url: str, grpc_headers=None, http_headers=None) -> None:
    g = grpcclient.InferenceServerClient(grpc_url)
    h = httpclient.InferenceServerClient(http_url)
    calls = {
        "gRPC index": lambda: g.get_model_repository_index(headers=grpc_headers),
        "gRPC unload": lambda: g.unload_model(C.SAM_DECODER_MODEL, headers=grpc_headers),
        "gRPC load": lambda: g.load_model(C.SAM_DECODER_MODEL, headers=grpc_headers),
        "gRPC trace settings": lambda: g.update_trace_settings(settings={"trace_rate": "1"},
                                                               headers=grpc_headers),
        "gRPC log settings": lambda: g.update_log_settings(settings={"log_verbose_level": 1},
                                                           headers=grpc_headers),
        "HTTP index": lambda: h.get_model_repository_index(headers=http_headers),
        "HTTP unload": lambda: h.unload_model(C.SAM_DECODER_MODEL, headers=http_headers),
        "HTTP load": lambda: h.load_model(C.SAM_DECODER_MODEL, headers=http_headers),
        "HTTP log settings": lambda: h.update_log_settings(settings={"log_verbose_level": 1},
                                                           headers=http_headers),
    }
    for name, call in calls.items():
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert "restricted" in refused.value.message(), f"{name}: {refused.value.message()}"
    g.close()
    h.close()


def test_admin_apis_are_closed_by_default(default_serve, astronaut_png):
    repository_calls_refused(default_serve.grpc_url, default_serve.http_url)
    # A guessed key does not open them either; inference, health and statistics stay open.
    repository_calls_refused(default_serve.grpc_url, default_serve.http_url,
                             {C.GRPC_RESTRICTED_HEADER_PREFIX + C.ADMIN_KEY_HEADER: "guess"},
                             {C.ADMIN_KEY_HEADER: "guess"})
    g = grpcclient.InferenceServerClient(default_serve.grpc_url)
    assert g.is_server_ready() and g.get_inference_statistics(C.SEGMENT_MODEL)
    assert IsekaiClient(default_serve.grpc_url).segment(astronaut_png, [ASTRONAUT_CLICK]).mask


def test_admin_key_opens_the_repository_api_to_its_holders_only(keyed_serve, astronaut_png):
    repository_calls_refused(keyed_serve.grpc_url, keyed_serve.http_url)  # without the header
    g = grpcclient.InferenceServerClient(keyed_serve.grpc_url)
    h = httpclient.InferenceServerClient(keyed_serve.http_url)
    states = {
        m["name"]: m["state"] for m in g.get_model_repository_index(headers=GRPC_KEY, as_json=True)["models"]
    }
    assert states[C.SEGMENT_MODEL] == "READY"
    g.unload_model(C.SEGMENT_MODEL, headers=GRPC_KEY)
    assert not h.is_model_ready(C.SEGMENT_MODEL)
    h.load_model(C.SEGMENT_MODEL, headers=HTTP_KEY)
    assert g.is_model_ready(C.SEGMENT_MODEL)
    assert IsekaiClient(keyed_serve.grpc_url).segment(astronaut_png, [ASTRONAUT_CLICK]).mask
    g.close()
    h.close()
