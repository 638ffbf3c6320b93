"""When a client may send a request again, and how long it waits first.

Every isekai call is idempotent: a swap with the same seed gives the same bytes, a segment call holds no
state, the characters list only reads. So a request the server refused without an answer may be sent again;
which refusals those are is :func:`retryable`, and :func:`backoff` spaces the tries out (exponential, with
jitter, so that clients refused together do not come back together)."""

from __future__ import annotations

import random

from isekai import constants as C

# gRPC's and Triton's names for the statuses (tritonclient's InferenceServerException.status()).
UNAVAILABLE = ("StatusCode.UNAVAILABLE", "UNAVAILABLE", "503")
# isekai serve draining (README "Shutdown"): the public models are unloaded, another server may take the
# request.
DRAINING = "has no available versions"


def is_busy(status: str | None, message: str) -> bool:
    """The server refused the request because it is busy: a step's queue was full, or the request waited in
    one past its timeout (:data:`isekai.constants.BUSY_MESSAGES`, status UNAVAILABLE)."""
    return (status or "") in UNAVAILABLE and any(m in message for m in C.BUSY_MESSAGES)


def retryable(status: str | None, message: str) -> bool:
    """Whether a request that failed so may be sent again: refused as busy, the server unreachable
    (UNAVAILABLE: restarting, a connection reset), or draining for a shutdown. Never a bad input
    (INVALID_ARGUMENT), a model failing (INTERNAL) or the caller's own deadline spent (DEADLINE_EXCEEDED)."""
    return (status or "") in UNAVAILABLE or DRAINING in message


def backoff(
    attempt: int,
    rng: random.Random | None = None,
    base_s: float = C.RETRY_BASE_DELAY_S,
    max_s: float = C.RETRY_MAX_DELAY_S,
) -> float:
    """Seconds to wait before try ``attempt + 1`` (``attempt`` >= 1): ``base * 2**(attempt-1)``, at most
    ``max``, times a random factor in [0.5, 1]."""
    if attempt < 1:
        raise ValueError(f"attempt should be >= 1 but is {attempt}")
    delay = min(max_s, base_s * 2 ** (attempt - 1))
    return delay * (rng or random).uniform(0.5, 1.0)
