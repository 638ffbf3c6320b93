"""Triton's own per-model statistics, read before and after some work, so the difference says what ran."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelStats:
    """Cumulative counters of one model (the statistics extension's inference_stats)."""

    executions: int  # model executions (a dynamic batch counts once)
    inferences: int  # requests served (success count)
    queue_ns: int
    compute_ns: int  # compute_input + compute_infer + compute_output

    def __sub__(self, other: ModelStats) -> ModelStats:
        return ModelStats(
            self.executions - other.executions,
            self.inferences - other.inferences,
            self.queue_ns - other.queue_ns,
            self.compute_ns - other.compute_ns,
        )


def model_stats(triton_client) -> dict[str, ModelStats]:
    """All models' counters from a ``tritonclient.grpc.InferenceServerClient``."""
    raw = triton_client.get_inference_statistics(as_json=True)
    stats = {}
    for entry in raw.get("model_stats", []):
        inf = entry.get("inference_stats", {})

        def ns(key: str, inf=inf) -> int:
            return int(inf.get(key, {}).get("ns", 0))

        stats[entry["name"]] = ModelStats(
            executions=int(entry.get("execution_count", 0)),
            inferences=int(inf.get("success", {}).get("count", 0)),
            queue_ns=ns("queue"),
            compute_ns=ns("compute_input") + ns("compute_infer") + ns("compute_output"),
        )
    return stats


def stats_delta(before: dict[str, ModelStats], after: dict[str, ModelStats]) -> dict[str, ModelStats]:
    zero = ModelStats(0, 0, 0, 0)
    return {name: after[name] - before.get(name, zero) for name in after}


def format_stage_table(delta: dict[str, ModelStats], order: list[str] | None = None) -> str:
    """A small table: model, requests, queue ms, compute ms (BLS callers include their callees' time)."""
    names = [n for n in (order or sorted(delta)) if n in delta and delta[n].inferences]
    lines = [f"{'model':<16}{'requests':>9}{'queue ms':>11}{'compute ms':>12}"]
    for n in names:
        d = delta[n]
        lines.append(f"{n:<16}{d.inferences:>9}{d.queue_ns / 1e6:>11.1f}{d.compute_ns / 1e6:>12.1f}")
    return "\n".join(lines)


def prometheus_values(metrics_url: str, prefix: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Samples of Triton's metrics endpoint whose name starts with ``prefix``, summed over their labels.

    ``metrics_url`` is ``host:port`` or a full ``http://host:port/metrics`` URL.
    """
    import urllib.request  # noqa: PLC0415

    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode("utf-8")
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        sample, _, value = line.rpartition(" ")
        name = sample.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


def cache_counters(metrics_url: str) -> dict[str, float]:
    """The server's SAM embedding-cache counters: ``hits``, ``misses``, ``evictions``, ``entries``,
    ``bytes``."""
    prefix = "isekai_embedding_cache_"
    raw = prometheus_values(metrics_url, prefix)
    return {name[len(prefix):].removesuffix("_total"): value for name, value in raw.items()}


# Triton's per-model counters on the metrics endpoint (cumulative since the server started).
TRITON_MODEL_METRICS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_duration_us",
)


def model_metrics(metrics_url: str, timeout_s: float = 10.0) -> dict[str, dict[str, float]]:
    """Triton's per-model counters from the metrics endpoint: ``{model: {metric: value}}`` (versions summed).

    Only :data:`TRITON_MODEL_METRICS`; read it before and after some work and pass both to
    :func:`metrics_delta`.
    """
    import re  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode("utf-8")
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name not in TRITON_MODEL_METRICS:
            continue
        model = re.search(r'model="([^"]*)"', line)
        if model is None:
            continue
        per_model = out.setdefault(model.group(1), {})
        per_model[name] = per_model.get(name, 0.0) + float(line.rpartition(" ")[2])
    return out


def settled_model_metrics(metrics_url: str, timeout_s: float = 5.0,
                          interval_s: float = 0.25) -> dict[str, dict[str, float]]:
    """:func:`model_metrics` once two reads ``interval_s`` apart agree (or after ``timeout_s``).

    Triton counts a request when it releases it, which can be just after the client got its response: read the
    "after" side of a run with this, or the last requests may be missing from it.
    """
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    previous = model_metrics(metrics_url)
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        current = model_metrics(metrics_url)
        if current == previous:
            return current
        previous = current
    return previous


@dataclass(frozen=True)
class ModelLoad:
    """One model's share of a run, from the metrics endpoint: requests, and queue vs compute time per
    request."""

    model: str
    requests: int  # successful requests
    failures: int
    executions: int  # model executions (a dynamic batch counts once)
    queue_ms: float  # mean queue time per request
    compute_ms: float  # mean compute (infer) time per request


def metrics_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> list[ModelLoad]:
    """Per-model :class:`ModelLoad` of what happened between two :func:`model_metrics` reads (idle models left
    out)."""
    rows = []
    for model in sorted(after):
        def d(metric: str, model=model) -> float:
            return after[model].get(metric, 0.0) - before.get(model, {}).get(metric, 0.0)

        ok, failed = int(d("nv_inference_request_success")), int(d("nv_inference_request_failure"))
        if ok + failed == 0:
            continue
        per = max(ok, 1)
        rows.append(ModelLoad(model, ok, failed, int(d("nv_inference_exec_count")),
                              d("nv_inference_queue_duration_us") / 1e3 / per,
                              d("nv_inference_compute_infer_duration_us") / 1e3 / per))
    return rows


def format_model_load(rows: list[ModelLoad]) -> str:
    """The rows of :func:`metrics_delta` as a Markdown table."""
    lines = ["| model | requests | failures | executions | queue ms/request | compute ms/request |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.model} | {r.requests} | {r.failures} | {r.executions} | {r.queue_ms:.1f} | "
              f"{r.compute_ms:.1f} |"
              for r in rows]
    return "\n".join(lines)
