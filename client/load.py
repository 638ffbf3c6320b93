"""A bounded load generator for the isekai models: N concurrent gRPC clients, a request budget and a time
budget.

    from isekai.client.load import LoadMix, Photo, run_load

    mix = LoadMix(photos=[Photo(open("a.jpg", "rb").read(), clicks=((312, 240),))], swap_fraction=0.1,
                  swap_options={"steps": 2})
    report = run_load(["localhost:8001"], requests=200, concurrency=4, duration_s=120, mix=mix)
    print(report.table())

Request ``i`` is drawn from a generator seeded with ``(mix.seed, i)``: the same arguments send the same
requests (which photo, which click, segment or swap), whatever the concurrency. Every worker has its own
client (``IsekaiClient``: round-robin over ``urls``). Errors are counted, never raised; ``report.ok`` says
whether there were none.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from isekai.client import api
from isekai.client.client import IsekaiClient, Point


@dataclass(frozen=True)
class Photo:
    """An encoded photo and the clicks (x, y in its pixels) a simulated user picks from."""

    image: bytes
    clicks: tuple[Point, ...]


@dataclass(frozen=True)
class LoadMix:
    """What a load run sends.

    Attributes:
        photos: photos to pick from (uniformly); repeat picks exercise the server's embedding cache.
        swap_fraction: share of requests that are whole swaps (``isekai``); the rest are ``isekai_segment``.
        swap_options: keyword options of :meth:`IsekaiClient.swap` (e.g. ``{"steps": 2}``).
        max_clicks: each request sends 1..max_clicks positive clicks drawn from its photo's clicks.
        seed: seeds the request schedule.
    """

    photos: tuple[Photo, ...]
    swap_fraction: float = 0.0
    swap_options: Mapping[str, object] = field(default_factory=dict)
    max_clicks: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.photos or any(not p.clicks for p in self.photos):
            raise ValueError("a load mix needs at least one photo, each with at least one click")
        if not 0.0 <= self.swap_fraction <= 1.0:
            raise ValueError(f"swap_fraction must be in [0, 1] but is {self.swap_fraction}")

    def request(self, i: int) -> tuple[str, int, list[Point]]:
        """Request ``i``: (model, photo index, clicks)."""
        rng = np.random.default_rng((self.seed, i))
        model = api.SWAP_MODEL if rng.random() < self.swap_fraction else api.SEGMENT_MODEL
        p = int(rng.integers(len(self.photos)))
        clicks = self.photos[p].clicks
        n = int(rng.integers(1, min(self.max_clicks, len(clicks)) + 1))
        picked = rng.choice(len(clicks), size=n, replace=False)
        return model, p, [clicks[int(k)] for k in picked]


@dataclass(frozen=True)
class LoadReport:
    """Counts and latencies of one run. Latencies are seconds, per model, successful requests only."""

    sent: int
    succeeded: int
    failed: int
    wall_s: float
    by_model: Mapping[str, int]  # requests sent per model
    latencies_s: Mapping[str, tuple[float, ...]]
    errors: tuple[str, ...]  # "model: message" of the first failures (at most LoadReport.MAX_ERRORS)

    MAX_ERRORS = 20

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.sent > 0

    @property
    def throughput(self) -> float:
        """Successful requests per second of wall time."""
        return self.succeeded / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_ms(self, model: str, q: float) -> float:
        values = self.latencies_s.get(model, ())
        return float(np.percentile(values, q)) * 1e3 if values else float("nan")

    def table(self) -> str:
        lines = [f"{'model':<16}{'sent':>7}{'ok':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}"]
        for model in sorted(self.by_model):
            lines.append(f"{model:<16}{self.by_model[model]:>7}{len(self.latencies_s.get(model, ())):>7}"
                         f"{self.percentile_ms(model, 50):>10.1f}{self.percentile_ms(model, 95):>10.1f}"
                         f"{self.percentile_ms(model, 99):>10.1f}")
        lines.append(f"{self.sent} sent, {self.succeeded} ok, {self.failed} failed in {self.wall_s:.1f} s "
                     f"({self.throughput:.1f} req/s)")
        return "\n".join(lines + [f"  error: {e}" for e in self.errors])


def run_load(
    urls: str | Sequence[str],
    requests: int,
    concurrency: int,
    duration_s: float | None,
    mix: LoadMix,
    *,
    timeout_s: float = 600.0,
) -> LoadReport:
    """Send up to ``requests`` requests from ``concurrency`` workers, stopping early after ``duration_s``
    seconds (None: no time limit; requests in flight then still finish). Blocks until done."""
    if requests < 0 or concurrency < 1:
        raise ValueError(f"requests must be >= 0 and concurrency >= 1, got {requests} and {concurrency}")
    lock = threading.Lock()
    state = {"next": 0}
    by_model: Counter[str] = Counter()
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    failed = [0]
    started = time.monotonic()
    deadline = None if duration_s is None else started + duration_s

    def take() -> int | None:
        with lock:
            i = state["next"]
            if i >= requests or (deadline is not None and time.monotonic() >= deadline):
                return None
            state["next"] = i + 1
            return i

    def worker() -> None:
        client = IsekaiClient(urls, timeout_s=timeout_s)
        try:
            while (i := take()) is not None:
                model, p, clicks = mix.request(i)
                image = mix.photos[p].image
                t0 = time.perf_counter()
                try:
                    if model == api.SWAP_MODEL:
                        client.swap(image, clicks, **mix.swap_options)
                    else:
                        client.segment(image, clicks)
                except Exception as err:  # noqa: BLE001 - counted and reported, the run goes on
                    with lock:
                        by_model[model] += 1
                        failed[0] += 1
                        if len(errors) < LoadReport.MAX_ERRORS:
                            errors.append(f"{model}: {err}")
                    continue
                elapsed = time.perf_counter() - t0
                with lock:
                    by_model[model] += 1
                    latencies.setdefault(model, []).append(elapsed)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, name=f"load-{k}", daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = sum(by_model.values())
    return LoadReport(
        sent=sent,
        succeeded=sent - failed[0],
        failed=failed[0],
        wall_s=time.monotonic() - started,
        by_model=dict(by_model),
        latencies_s={m: tuple(v) for m, v in latencies.items()},
        errors=tuple(errors),
    )
