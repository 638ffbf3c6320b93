"""Swaps' admission at prepare (ensemble/admission.py): Triton's pending-request gauge read from the metrics
text, the refusal in the words clients retry on, and a server whose metrics cannot be read."""

from __future__ import annotations

import logging

import pytest

from isekai import constants as C
from isekai.client import retry
from isekai.ensemble.admission import PENDING_METRIC, Admission, Busy, metrics_url, pending_requests

# As Triton 2.51 writes it: HELP and TYPE lines, one sample per model and version, other models around it.
METRICS = f"""# HELP {PENDING_METRIC} Instantaneous number of pending requests awaiting execution per-model.
# TYPE {PENDING_METRIC} gauge
{PENDING_METRIC}{{model="lama",version="1"}} 7
{PENDING_METRIC}{{model="diffusion",version="1"}} {{waiting}}
{PENDING_METRIC}{{model="diffusion_x",version="1"}} 9
nv_inference_request_success{{model="diffusion",version="1"}} 120
"""


def text(waiting: int) -> str:
    return METRICS.replace("{waiting}", str(waiting))


def test_the_gauge_is_read_for_the_model_and_nothing_else():
    assert pending_requests(text(3), C.DIFFUSION_MODEL) == 3
    assert pending_requests(text(0), C.LAMA_MODEL) == 7
    assert pending_requests(text(3), "unet") is None
    two_versions = text(2) + f'{PENDING_METRIC}{{model="diffusion",version="2"}} 1\n'
    assert pending_requests(two_versions, C.DIFFUSION_MODEL) == 3


@pytest.mark.parametrize("waiting", [0, C.DIFFUSION_MAX_WAITING - 1])
def test_a_swap_is_admitted_below_the_limit(waiting):
    Admission("http://x/metrics", read=lambda url: text(waiting)).admit()


def test_a_swap_is_refused_at_the_limit_in_words_clients_retry_on():
    admission = Admission("http://x/metrics", read=lambda url: text(C.DIFFUSION_MAX_WAITING))
    with pytest.raises(Busy) as refused:
        admission.admit()
    message = str(refused.value)
    assert f"{C.DIFFUSION_MAX_WAITING} swaps are waiting for diffusion" in message, message
    assert retry.is_busy("StatusCode.UNAVAILABLE", message)


def test_unreadable_metrics_admit_every_swap_and_warn_once(caplog):
    def down(url: str) -> str:
        raise OSError("connection refused")

    for read in (down, lambda url: "no gauge here\n"):
        admission = Admission("http://127.0.0.1:9/metrics", read=read)
        with caplog.at_level(logging.WARNING, logger="isekai"):
            admission.admit()
            admission.admit()
        warnings = [r.getMessage() for r in caplog.records if "without a bound" in r.getMessage()]
        assert len(warnings) == 1 and C.METRICS_URL_ENV in warnings[0], warnings
        caplog.clear()


def test_the_real_reader_fails_open_on_a_closed_port():
    assert Admission("http://127.0.0.1:9/metrics").waiting() is None


def test_limit_and_url():
    with pytest.raises(ValueError, match="at least 1"):
        Admission("http://x/metrics", limit=0)
    assert metrics_url("0.0.0.0", 8002) == "http://127.0.0.1:8002/metrics"
    assert metrics_url("10.0.0.5", 9002) == "http://10.0.0.5:9002/metrics"


def test_the_page_says_busy_not_unreachable():
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    from isekai.client.web.app import readable  # noqa: PLC0415

    words = "the server is busy: refused 4 tries (last answer: Exceeds maximum queue size: 4 swaps waiting)"
    busy = InferenceServerException(words, status="StatusCode.UNAVAILABLE")
    page = readable(busy, "127.0.0.1:8001")
    assert page.status == 503 and "busy" in str(page) and "cannot be reached" not in str(page)
    down = InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
    assert "cannot be reached" in str(readable(down, "127.0.0.1:8001"))
