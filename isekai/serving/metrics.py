"""isekai's own counters on Triton's metrics endpoint (:8002/metrics), beside nv_inference_*.

Prometheus scrapes them with the rest, and tests read them to prove where work went:

- the SAM embedding cache (``preprocess``): ``isekai_embedding_cache_hits_total`` / ``..._misses_total`` /
  ``..._evictions_total`` (counters) and ``isekai_embedding_cache_entries`` / ``..._bytes`` (gauges);
- characters' weights (``unet``, ``text_encoder``): ``isekai_character_weights_loads_total`` /
  ``..._evictions_total`` (counters) and ``isekai_character_weights_adapter_bytes`` / ``..._graph_bytes``
  (gauges: LoRA adapters and full fine-tunes' own graphs held),

each labelled with the model that owns them.
"""

from __future__ import annotations

import logging

import triton_python_backend_utils as pb_utils

log = logging.getLogger("isekai")


class StatsMetrics:
    """Mirror snapshots of a stats dataclass into Triton custom metrics (a no-op where metrics are off).

    ``counters`` are fields that only grow (exported as ``<prefix>_<field>_total``); ``gauges`` are exported
    as ``<prefix>_<field>``.
    """

    def __init__(self, prefix: str, what: str, model: str, counters: tuple[str, ...],
                 gauges: tuple[str, ...]) -> None:
        self.counters, self.gauges = counters, gauges
        self._seen = dict.fromkeys(counters, 0)
        self._metrics: dict[str, object] = {}
        # Triton invalidates a Metric whose MetricFamily was garbage-collected: keep the families alive too.
        self._families: list[object] = []
        labels = {"model": model}
        try:
            for name in counters:
                family = pb_utils.MetricFamily(name=f"{prefix}_{name}_total",
                                               kind=pb_utils.MetricFamily.COUNTER,
                                               description=f"{what} {name}")
                self._families.append(family)
                self._metrics[name] = family.Metric(labels=labels)
            for name in gauges:
                family = pb_utils.MetricFamily(name=f"{prefix}_{name}", kind=pb_utils.MetricFamily.GAUGE,
                                               description=f"{what} {name} held")
                self._families.append(family)
                self._metrics[name] = family.Metric(labels=labels)
        except Exception as err:  # noqa: BLE001 - a server started with --allow-metrics=false has none
            log.warning("%s metrics are off: %s", what, err)
            self._metrics = {}

    def update(self, stats: object) -> None:
        if not self._metrics:
            return
        for name in self.counters:
            value = getattr(stats, name)
            if value > self._seen[name]:
                self._metrics[name].increment(value - self._seen[name])
                self._seen[name] = value
        for name in self.gauges:
            self._metrics[name].set(getattr(stats, name))


def cache_metrics(model: str) -> StatsMetrics:
    """The SAM embedding cache's metrics (:class:`isekai.ensemble.cache.CacheStats` snapshots)."""
    return StatsMetrics("isekai_embedding_cache", "SAM image-embedding cache", model,
                        ("hits", "misses", "evictions"), ("entries", "bytes"))


def character_weights_metrics(model: str) -> StatsMetrics:
    """Characters' weights held by an ONNX model (:class:`isekai.serving.character_weights.WeightsStats`)."""
    return StatsMetrics("isekai_character_weights", "characters' weights", model,
                        ("loads", "evictions"), ("adapter_bytes", "graph_bytes"))
