"""The autoscaler's metric is real: a real Prometheus scrapes a real tritonserver under concurrent load, and
the exact PromQL of the shipped prometheus-adapter rule (k8s/prometheus-adapter/configmap.yaml), with its
template variables filled in as the adapter fills them, rises from 0 to the queueing Triton itself reports.

Everything listens on 127.0.0.1; the load is bounded in count and time. Needs Debian's ``prometheus``
(scripts/install-test-deps installs it); skipped with the reason where it is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import yaml

from isekai import constants as C
from isekai.client.stats import model_stats
from isekai.serving.server import free_port
from tests.conftest import ROOT, start_server
from tests.k8s.tiny_repository import infer_once, write_tiny_repository

pytestmark = pytest.mark.e2e

# The labels Prometheus Operator puts on a PodMonitor target, as the adapter rule's resources map them.
NAMESPACE, POD = "isekai-test", "isekai-triton-0"
SCRAPE_S = 1
SLEEP_MS = 20
CLIENTS, REQUESTS_PER_CLIENT = 8, 12  # 96 requests of 20 ms on one instance: ~2 s of work, deep queues
LOAD_DEADLINE_S = 60


def adapter_rule() -> dict:
    configmap = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter" / "configmap.yaml").read_text())
    (rule,) = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    return rule


def adapter_query(template: str, namespace: str, pods: list[str]) -> str:
    """Fill the adapter's metricsQuery template as prometheus-adapter does for a Pods metric of these pods."""
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return template.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping the given targets every SCRAPE_S, data in ``workdir``."""

    def __init__(self, binary: str, workdir: Path, target: str, labels: dict[str, str]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "scrape_configs": [
                {"job_name": "triton", "static_configs": [{"targets": [target], "labels": labels}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout_s}s: {self.log.read_text()[-2000:]}")

    def wait_for(self, query: str, done, timeout_s: float = 30) -> None:
        """Poll an instant ``query`` until ``done(value of its first sample)`` is true."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.api("query", query=query)["result"]
            if result and done(float(result[0]["value"][1])):
                return
            time.sleep(SCRAPE_S / 4)
        raise TimeoutError(f"{query} did not reach the expected value in {timeout_s}s")

    def value(self, query: str) -> dict[str, float]:
        return {
            s["metric"].get("pod", ""): float(s["value"][1]) for s in self.api("query", query=query)["result"]
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (scripts/install-test-deps installs it as root)")
    return binary


def _load(grpc_url: str) -> tuple[int, list[BaseException]]:
    """CLIENTS threads x REQUESTS_PER_CLIENT requests to the ensemble; returns (successes, errors)."""
    deadline = time.monotonic() + LOAD_DEADLINE_S
    done, errors, lock = [0], [], threading.Lock()

    def client_loop() -> None:
        client = grpcclient.InferenceServerClient(grpc_url)
        try:
            for i in range(REQUESTS_PER_CLIENT):
                if time.monotonic() > deadline:
                    return
                infer_once(client, float(i))
                with lock:
                    done[0] += 1
        except Exception as err:  # noqa: BLE001 - reported by the test
            with lock:
                errors.append(err)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=LOAD_DEADLINE_S + 30)
    return done[0], errors


def test_adapter_query_rises_under_load_and_matches_tritons_own_queueing(tmp_path, prometheus_binary):
    rule = adapter_rule()
    query = adapter_query(rule["metricsQuery"], NAMESPACE, [POD])
    assert "<<" not in query, f"unfilled template variable in {query}"

    repository = write_tiny_repository(tmp_path / "repository", sleep_ms=SLEEP_MS)
    server = start_server(repository, tmp_path / "triton.log")
    prometheus = None
    try:
        target = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
        prometheus = Prometheus(prometheus_binary, tmp_path, target, {"namespace": NAMESPACE, "pod": POD})
        prometheus.wait_ready()
        up = f'up{{job="triton",pod="{POD}"}}'
        # increase() needs two samples in its window
        prometheus.wait_for(f"count_over_time({up}[1m])", lambda samples: samples >= 2)

        # The adapter finds the series through the rule's seriesQuery, with the labels it maps to objects.
        series = prometheus.api("series", **{"match[]": rule["seriesQuery"]})
        assert {(s["namespace"], s["pod"]) for s in series} == {(NAMESPACE, POD)}
        assert {s["model"] for s in series} >= {C.ENSEMBLE_MODEL}

        idle = prometheus.value(query)
        assert idle == {POD: 0.0}, f"an idle pod must read 0 (not NaN or missing): {idle}"

        triton = grpcclient.InferenceServerClient(server.grpc_url)
        served, errors = _load(server.grpc_url)
        stats = model_stats(triton)
        triton.close()
        assert not errors, errors[:3]
        assert served == CLIENTS * REQUESTS_PER_CLIENT
        # the final counters: a scrape that started a full interval after the last response
        load_end = time.time()
        prometheus.wait_for(f"timestamp({up})", lambda stamp: stamp >= load_end + SCRAPE_S)

        loaded = prometheus.value(query)
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop(grace_s=30)

    # What Triton says: all queueing over the public requests served, in microseconds.
    expected_us = sum(s.queue_ns for s in stats.values()) / 1000 / stats[C.ENSEMBLE_MODEL].inferences
    assert expected_us > SLEEP_MS * 1000, f"the load did not queue: {expected_us:.0f} us per request"
    assert set(loaded) == {POD}
    assert loaded[POD] > idle[POD]
    # increase() extrapolates numerator and denominator alike (same scrapes): their ratio is Triton's own.
    assert loaded[POD] == pytest.approx(expected_us, rel=0.25), (loaded, expected_us)
