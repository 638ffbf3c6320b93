"""The fast path's options end to end over gRPC, on one server: an LCM repository (``isekai export sd
--lcm-lora``) whose swaps without steps or guidance run the exported scheduler's defaults (4 steps at strength
0.75 = 3 batch-1 UNet calls, no guidance pair; more on request), and compose's other silhouette source,
``sam`` (SAM on the generated crop: one more encode per swap than the default, the person's own mask)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from isekai import constants as C
from isekai.client.stats import model_stats, stats_delta
from tests.conftest import ASTRONAUT_CLICK, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lcm_server(lcm_repository, tmp_path_factory):
    work = tmp_path_factory.mktemp("triton-lcm")
    repository = shutil.copytree(lcm_repository, work / "repository", copy_function=os.link)
    config = repository / C.COMPOSE_MODEL / "config.pbtxt"
    config.unlink()  # a hard link to the shared repository's file: written anew, not through the link
    text = (lcm_repository / C.COMPOSE_MODEL / "config.pbtxt").read_text()
    config.write_text(re.sub(r'(key: "silhouette" value: \{ string_value: )"person_mask"', r'\1"sam"', text))
    assert '"sam"' in config.read_text()
    server = start_server(repository, work / "server.log")
    yield server
    server.stop(grace_s=30)


@pytest.fixture(scope="module")
def clients(lcm_server):
    import tritonclient.grpc as grpcclient  # noqa: PLC0415 - tritonclient only for the e2e tests

    from isekai.client.client import IsekaiClient  # noqa: PLC0415

    client, raw = IsekaiClient(lcm_server.grpc_url), grpcclient.InferenceServerClient(lcm_server.grpc_url)
    yield client, raw
    client.close()
    raw.close()


def unet_calls(raw) -> tuple[int, int]:
    """(requests, rows) the unet model has served: Triton's success count and its inference_count (rows of the
    batch dimension, so a batch-2 guidance pair counts 2)."""
    entry = raw.get_inference_statistics(C.UNET_MODEL, as_json=True)["model_stats"][0]
    # Protobuf's JSON leaves zero counters out.
    return int(entry["inference_stats"].get("success", {}).get("count", 0)), int(
        entry.get("inference_count", 0)
    )


def test_defaults_follow_the_lcm_scheduler(clients, astronaut_png):
    client, raw = clients
    requests, rows = unet_calls(raw)
    first = client.swap(astronaut_png, [ASTRONAUT_CLICK], seed=5)
    after = unet_calls(raw)
    assert first.result != first.background, "no person found: the diffusion would not run"
    steps = int(C.LCM_STEPS * C.DEFAULT_STRENGTH)
    # One batch-1 call per step: one row per request, no [negative, prompt] pair.
    assert (after[0] - requests, after[1] - rows) == (steps, steps) == (3, 3)
    again = client.swap(astronaut_png, [ASTRONAUT_CLICK], seed=5)
    assert again.result == first.result


def test_the_character_list_and_the_page_announce_the_lcm_defaults(clients, lcm_server):
    """Clients learn the steps a left-out option gets from the character list; the page shows that number."""
    import json  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from isekai.client.web.cli import PageServer  # noqa: PLC0415
    from isekai.serving.server import free_port  # noqa: PLC0415

    client, _ = clients
    assert {(c.steps, c.guidance) for c in client.characters()} == {(C.LCM_STEPS, C.LCM_GUIDANCE)}
    with (PageServer(lcm_server.grpc_url, port=free_port()) as page,
          urllib.request.urlopen(f"{page.url}api/config", timeout=60) as answer):
        config = json.loads(answer.read())
    assert config["limits"]["steps"] == [1, C.MAX_STEPS, C.LCM_STEPS]


def test_sam_silhouette_runs_sam_on_the_generated_crop(clients, astronaut_png):
    """With silhouette "sam", compose encodes the generated crop: 1 encode on a cached photo (default: 0)."""
    client, raw = clients
    client.swap(astronaut_png, [ASTRONAUT_CLICK], seed=6)  # the photo's embedding is cached by now
    before = model_stats(raw)
    out = client.swap(astronaut_png, [ASTRONAUT_CLICK], seed=6)
    delta = stats_delta(before, model_stats(raw))
    assert out.result != out.background
    assert delta[C.SAM_ENCODER_MODEL].inferences == 1 and delta[C.SAM_DECODER_MODEL].inferences == 2


def test_requests_may_ask_for_more_steps_and_guidance(clients, astronaut_png):
    client, raw = clients
    requests, rows = unet_calls(raw)
    out = client.swap(astronaut_png, [ASTRONAUT_CLICK], steps=8, guidance=2.0, seed=5)
    after = unet_calls(raw)
    assert out.result != out.background
    assert (after[0] - requests, after[1] - rows) == (6, 12)  # int(8 * 0.75) steps of a batch-2 guidance pair


def test_steps_times_strength_is_checked_against_the_scheduler_default(clients, astronaut_png):
    """Left-out steps are the scheduler's 4: strength 0.2 would run int(0.8) = 0 steps, refused by name, by
    preprocess: before the ensemble forks (a step failing beside lama leaves Triton 2.51's ensemble request in
    flight, and the server's shutdown then waited its whole exit timeout)."""
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    client, raw = clients
    before = model_stats(raw)
    with pytest.raises(
        InferenceServerException,
        match=r"steps \* strength must be >= 1 .* but is 4 \* 0.2 \(steps left out: the exported scheduler's",
    ):
        client.swap(astronaut_png, [ASTRONAUT_CLICK], strength=0.2)
    delta = stats_delta(before, model_stats(raw))
    assert delta[C.DIFFUSION_MODEL].executions == 0 and delta[C.LAMA_MODEL].executions == 0
