"""Admission of swaps: refuse a swap at ``prepare`` while too many wait for ``diffusion``.

Triton 2.51 cannot bound ``diffusion``'s own queue: its ensemble scheduler mishandles a step refused beside
another (``lama``; core PR #466), and the swap never finishes. ``prepare`` is the last step a swap passes
alone before that fork, and an error there takes the ordinary path of a failed step, so the bound is kept
there instead: before it lets a swap through, it reads how many requests wait in ``diffusion``'s queue
(Triton's own gauge ``nv_inference_pending_request_count`` on the metrics endpoint) and refuses the swap with
UNAVAILABLE in Triton's words for a full queue when that is :data:`isekai.constants.DIFFUSION_MAX_WAITING` or
more. ``prepare`` runs one request at a time, so at most the swap it just let through can be on its way and
not yet counted.

Where the metrics cannot be read (a server started with ``--allow-metrics=false``, another port), swaps are
admitted and a warning is logged once: refusing every swap because a gauge is missing would be worse than the
unbounded queue this replaces.
"""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable

from isekai import constants as C

log = logging.getLogger("isekai")

PENDING_METRIC = "nv_inference_pending_request_count"


class Busy(Exception):
    """The server holds as many swaps as it may; the message starts with Triton's words for a full queue."""


def pending_requests(metrics_text: str, model: str) -> int | None:
    """Requests waiting in ``model``'s queue (summed over its versions), or None when the gauge is absent."""
    pattern = re.compile(
        rf'^{PENDING_METRIC}\{{[^}}]*\bmodel="{re.escape(model)}"[^}}]*\}}\s+([0-9.eE+-]+)\s*$', re.MULTILINE
    )
    values = [float(m.group(1)) for m in pattern.finditer(metrics_text)]
    return int(sum(values)) if values else None


def metrics_url(host: str, port: int) -> str:
    """The metrics endpoint as seen from the server's own machine (a wildcard address is reached on
    loopback)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/metrics"


class Admission:
    """Refuses a swap while ``limit`` or more requests wait for ``model``.

    ``read`` returns the metrics endpoint's text (or raises ``OSError``); it is injectable for the unit
    tests."""

    def __init__(self, url: str, *, model: str = C.DIFFUSION_MODEL, limit: int = C.DIFFUSION_MAX_WAITING,
                 read: Callable[[str], str] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"admission limit must be at least 1, got {limit}")
        self.url = url
        self.model = model
        self.limit = limit
        self._read = read or _http_get
        self._warned = False

    def waiting(self) -> int | None:
        """Requests waiting for the model now, or None (logged once) when the gauge cannot be read."""
        try:
            count = pending_requests(self._read(self.url), self.model)
            why = f"no {PENDING_METRIC} for model '{self.model}'" if count is None else ""
        except (OSError, ValueError) as err:
            count, why = None, f"{type(err).__name__}: {err}"
        if count is None and not self._warned:
            self._warned = True
            log.warning("swaps are admitted without a bound: %s cannot be read from %s (%s); set %s to "
                        "Triton's metrics endpoint", PENDING_METRIC, self.url, why, C.METRICS_URL_ENV)
        return count

    def admit(self) -> None:
        """Return when a swap may go on; raise :class:`Busy` when the model's queue is full."""
        waiting = self.waiting()
        if waiting is not None and waiting >= self.limit:
            raise Busy(f"{C.BUSY_MESSAGES[0]}: {waiting} swaps are waiting for {self.model} (at most "
                       f"{self.limit}); the server is busy, retry later")


def _http_get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=C.ADMISSION_READ_TIMEOUT_S) as response:
            return response.read().decode("utf-8", "replace")
    except urllib.error.URLError as err:  # an OSError; its reason says more than its str
        raise OSError(str(err.reason)) from err
