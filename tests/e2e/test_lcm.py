"""An LCM repository (``isekai export sd --lcm-lora``) end to end over gRPC: a swap without steps or guidance runs
the exported scheduler's defaults (4 steps at strength 0.75 = 3 batch-1 UNet calls, no guidance pair), a request
may still ask for more steps and guidance, and the same seed gives the same bytes."""

from __future__ import annotations

import pytest

from isekai import constants as C
from isekai.client.stats import model_stats, stats_delta
from tests.conftest import ASTRONAUT_CLICK, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lcm_server(lcm_repository, tmp_path_factory):
    server = start_server(lcm_repository, tmp_path_factory.mktemp("triton-lcm") / "server.log")
    yield server
    server.stop(grace_s=30)


@pytest.fixture(scope="module")
def clients(lcm_server):
    import tritonclient.grpc as grpcclient

    from isekai.client.client import IsekaiClient

    client, raw = IsekaiClient(lcm_server.grpc_url), grpcclient.InferenceServerClient(lcm_server.grpc_url)
    yield client, raw
    client.close()
    raw.close()


def test_defaults_follow_the_lcm_scheduler(clients, astronaut_png):
    client, raw = clients
    before = model_stats(raw)
    first = client.swap(astronaut_png, [ASTRONAUT_CLICK], seed=5)
    unet = stats_delta(before, model_stats(raw))[C.UNET_MODEL]
    assert first.result != first.background, "no person found: the diffusion would not run"
    steps = int(C.LCM_STEPS * C.DEFAULT_STRENGTH)
    # One batch-1 call per step: as many rows (inferences) as executions, no [negative, prompt] pair.
    assert (unet.inferences, unet.executions) == (steps, steps) == (3, 3)
    again = client.swap(astronaut_png, [ASTRONAUT_CLICK], seed=5)
    assert again.result == first.result


def test_requests_may_ask_for_more_steps_and_guidance(clients, astronaut_png):
    client, raw = clients
    before = model_stats(raw)
    out = client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=8, guidance=2.0, seed=5)
    unet = stats_delta(before, model_stats(raw))[C.UNET_MODEL]
    assert out.result != out.background
    assert (unet.inferences, unet.executions) == (12, 6)  # int(8 * 0.75) steps of a batch-2 guidance pair


def test_steps_times_strength_is_checked_against_the_scheduler_default(clients, astronaut_png):
    """The left-out steps are the scheduler's 4: strength 0.2 would run int(0.8) = 0 steps, refused by name."""
    from tritonclient.utils import InferenceServerException

    client, _ = clients
    with pytest.raises(InferenceServerException, match=r"steps \* strength should be at least 1 but is 4 \* 0.2"):
        client.swap(astronaut_png, [ASTRONAUT_CLICK], strength=0.2)
