"""Load shedding as configured: every step of the public ensembles has a bounded queue (STEP_QUEUE_SIZES) in
every profile, the BLS-only models are left to their callers' bounds, and the client's retry rules.
"""

from __future__ import annotations

import random

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from isekai import constants as C
from isekai.client import retry
from tests.unit.test_configs import REPOSITORY


def ensemble_steps(name: str) -> set[str]:
    config = text_format.Parse((REPOSITORY / name / "config.pbtxt").read_text(), mc.ModelConfig())
    return {step.model_name for step in config.ensemble_scheduling.step}


def test_every_step_of_the_public_ensembles_has_a_queue_size():
    steps = ensemble_steps(C.ENSEMBLE_MODEL) | ensemble_steps(C.SEGMENT_MODEL)
    assert steps == set(C.STEP_QUEUE_SIZES) | set(C.UNBOUNDED_STEPS)
    assert not set(C.STEP_QUEUE_SIZES) & set(C.UNBOUNDED_STEPS)


@pytest.mark.parametrize("model", sorted(C.STEP_QUEUE_SIZES))
def test_each_steps_configs_bound_its_queue(model):
    paths = [REPOSITORY / model / "config.pbtxt", *sorted((REPOSITORY / model / "configs").glob("*.pbtxt"))]
    for path in paths:
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert config.HasField("dynamic_batching"), f"{path}: no dynamic_batching, so no queue policy"
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == C.STEP_QUEUE_SIZES[model], path
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT, path
        assert policy.default_timeout_microseconds == C.QUEUE_TIMEOUT_S * 1_000_000, path
        # Triton applies a request's own timeout only below the default one, and only with the override
        # allowed.
        assert policy.allow_timeout_override, path
        if config.max_batch_size == 0:
            assert not config.dynamic_batching.preferred_batch_size, path


def test_models_called_only_through_bls_have_no_queue_limit():
    """Their callers' instances bound their queues, and a refusal there would waste a swap half done."""
    for model in (
        C.SAM_ENCODER_MODEL,
        C.UNET_MODEL,
        C.VAE_ENCODER_MODEL,
        C.VAE_DECODER_MODEL,
        C.TEXT_ENCODER_MODEL,
        C.UPSCALE_MODEL,
        C.EMBEDDING_CACHE_MODEL,
    ):
        assert "max_queue_size" not in (REPOSITORY / model / "config.pbtxt").read_text(), model


def test_busy_refusals_are_retried_and_told_apart():
    full = "in ensemble 'isekai', [request id: <id_unknown>] Exceeds maximum queue size"
    assert retry.is_busy("StatusCode.UNAVAILABLE", full) and retry.retryable("StatusCode.UNAVAILABLE", full)
    assert retry.is_busy("StatusCode.UNAVAILABLE", "Request timeout expired")
    assert retry.retryable("StatusCode.UNAVAILABLE", "failed to connect to all addresses")
    assert not retry.is_busy("StatusCode.UNAVAILABLE", "failed to connect to all addresses")
    assert retry.retryable(
        "StatusCode.NOT_FOUND", "Request for unknown model: 'isekai' has no available versions"
    )
    for status, message in (
        ("StatusCode.INVALID_ARGUMENT", "input 'steps' should be in [1, 100] but is 0"),
        ("StatusCode.INTERNAL", "unet: running the graph failed: RuntimeException: ..."),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded"),
    ):
        assert not retry.retryable(status, message) and not retry.is_busy(status, message), (status, message)


def test_backoff_doubles_up_to_its_cap_with_jitter():
    rng = random.Random(0)
    delays = [retry.backoff(a, rng) for a in range(1, 8)]
    for attempt, delay in enumerate(delays, start=1):
        top = min(C.RETRY_MAX_DELAY_S, C.RETRY_BASE_DELAY_S * 2 ** (attempt - 1))
        assert top / 2 <= delay <= top
    with pytest.raises(ValueError, match="attempt should be >= 1"):
        retry.backoff(0)


def test_steps_scheduled_beside_another_never_refuse():
    """Triton 2.51 mishandles a step refused beside another (core PR #466): lama and diffusion, which both
    read only prepare's tensors, have no queue policy; every other step is scheduled alone."""
    config = text_format.Parse((REPOSITORY / C.ENSEMBLE_MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    readers: dict[str, set[str]] = {}
    writer = {}
    for step in config.ensemble_scheduling.step:
        for tensor in step.output_map.values():
            writer[tensor] = step.model_name
    for step in config.ensemble_scheduling.step:
        readers[step.model_name] = {writer[t] for t in step.input_map.values() if t in writer}

    def upstream(model: str) -> set[str]:
        found = set(readers[model])
        for m in readers[model]:
            found |= upstream(m)
        return found

    # Two steps run beside each other when neither needs the other's tensors, directly or through other steps.
    beside = {m for m in readers for n in readers if m != n and m not in upstream(n) and n not in upstream(m)}
    assert beside == set(C.UNBOUNDED_STEPS)
    for model in C.UNBOUNDED_STEPS:
        for path in [REPOSITORY / model / "config.pbtxt", *(REPOSITORY / model / "configs").glob("*.pbtxt")]:
            assert "max_queue_size" not in path.read_text() and "timeout_action" not in path.read_text(), path
