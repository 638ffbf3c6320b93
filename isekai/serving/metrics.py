"""The embedding cache's counters on Triton's own metrics endpoint (:8002/metrics), beside nv_inference_*.

Prometheus scrapes them with the rest, and tests read them to prove where an embedding came from:
``isekai_embedding_cache_hits_total`` / ``..._misses_total`` / ``..._evictions_total`` (counters) and
``isekai_embedding_cache_entries`` / ``..._bytes`` (gauges), labelled with the model that owns the cache.
"""

from __future__ import annotations

import logging

import triton_python_backend_utils as pb_utils

from isekai.ensemble.cache import CacheStats

log = logging.getLogger("isekai")

PREFIX = "isekai_embedding_cache"
COUNTERS = ("hits", "misses", "evictions")
GAUGES = ("entries", "bytes")


class CacheMetrics:
    """Mirror :class:`CacheStats` snapshots into Triton custom metrics (a no-op where metrics are off)."""

    def __init__(self, model: str) -> None:
        self._seen = dict.fromkeys(COUNTERS, 0)
        self._metrics: dict[str, object] = {}
        # Triton invalidates a Metric whose MetricFamily was garbage-collected: keep the families alive too.
        self._families: list[object] = []
        labels = {"model": model}
        try:
            for name in COUNTERS:
                family = pb_utils.MetricFamily(name=f"{PREFIX}_{name}_total", kind=pb_utils.MetricFamily.COUNTER,
                                               description=f"SAM image-embedding cache {name}")
                self._families.append(family)
                self._metrics[name] = family.Metric(labels=labels)
            for name in GAUGES:
                family = pb_utils.MetricFamily(name=f"{PREFIX}_{name}", kind=pb_utils.MetricFamily.GAUGE,
                                               description=f"SAM image-embedding cache {name} held")
                self._families.append(family)
                self._metrics[name] = family.Metric(labels=labels)
        except Exception as err:  # noqa: BLE001 - a server started with --allow-metrics=false has none
            log.warning("embedding cache metrics are off: %s", err)
            self._metrics = {}

    def update(self, stats: CacheStats) -> None:
        if not self._metrics:
            return
        for name in COUNTERS:
            value = getattr(stats, name)
            if value > self._seen[name]:
                self._metrics[name].increment(value - self._seen[name])
                self._seen[name] = value
        for name in GAUGES:
            self._metrics[name].set(getattr(stats, name))
