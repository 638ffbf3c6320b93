"""A small kustomize renderer for the features k8s/ uses, so the manifests are tested where kubectl is absent.

Supported, and nothing else (an unknown kustomization field raises, so a new feature cannot be skipped
silently):
``resources`` (files, or folders with a kustomization.yaml), ``patches`` (strategic-merge patches matched by
kind and name, or JSON 6902 operation lists with a ``target``), and ``namespace``.
Where ``kubectl`` exists, tests/k8s/test_manifests.py checks this renderer against ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

_SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace"}
# Strategic-merge keys of the list fields k8s/ patches; any other list is replaced whole, as kustomize does
# for lists without a patchMergeKey (tolerations, args, command).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
# Kinds without a namespace (kustomize's namespace field leaves them alone).
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "APIService"}


def load_yaml_documents(path: Path) -> list[Object]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def render(directory: str | Path) -> list[Object]:
    """The objects ``kustomize build directory`` emits (in resource order, not kustomize's sort order)."""
    directory = Path(directory)
    kustomization_path = directory / "kustomization.yaml"
    if not kustomization_path.exists():
        raise FileNotFoundError(f"no kustomization.yaml in {directory}")
    spec = yaml.safe_load(kustomization_path.read_text()) or {}
    unknown = set(spec) - _SUPPORTED
    if unknown:
        raise ValueError(
            f"{kustomization_path}: fields {sorted(unknown)} are not supported by this renderer "
            f"(supported: {sorted(_SUPPORTED)}); extend tests/k8s/kustomize.py"
        )
    objects: list[Object] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        objects.extend(render(path) if path.is_dir() else load_yaml_documents(path))
    for patch in spec.get("patches", []):
        _apply_patch(objects, directory, patch)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return objects


def _apply_patch(objects: list[Object], directory: Path, patch: dict[str, Any]) -> None:
    if "path" in patch:
        body = yaml.safe_load((directory / patch["path"]).read_text())
    elif "patch" in patch:
        body = yaml.safe_load(patch["patch"])
    else:
        raise ValueError(f"patch {patch} in {directory} has neither path nor patch")
    if isinstance(body, list):  # JSON 6902
        if "target" not in patch:
            raise ValueError(f"JSON 6902 patch {patch} in {directory} needs a target")
        matched = [o for o in objects if _matches(o, patch["target"])]
        for obj in matched:
            for op in body:
                _json6902(obj, op)
    else:
        target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        matched = [o for o in objects if _matches(o, target)]
        for i, obj in enumerate(objects):
            if any(obj is m for m in matched):
                objects[i] = strategic_merge(obj, body)
    if not matched:
        raise ValueError(f"patch {patch} in {directory} matches no object")


def _matches(obj: Object, target: dict[str, Any]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    checks = {
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "group": group,
        "version": version,
        "namespace": obj["metadata"].get("namespace"),
    }
    for key, value in target.items():
        if key not in checks:
            raise ValueError(f"patch target field {key!r} is not supported (supported: {sorted(checks)})")
        if checks[key] != value:
            return False
    return True


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """Kubernetes strategic merge of ``patch`` into a copy of ``base``: maps merge, keyed lists by key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        key = _list_merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        merged, added = copy.deepcopy(base), []
        for item in patch:
            existing = next((m for m in merged if m.get(key) == item.get(key)), None)
            if existing is None:
                added.append(copy.deepcopy(item))
            else:
                merged[merged.index(existing)] = strategic_merge(existing, item)
        return added + merged  # kustomize puts the patch's new items first
    return copy.deepcopy(patch)


def _list_merge_key(field: str | None, items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if field == "ports":  # container ports merge by containerPort, Service ports by port
        return "containerPort" if all("containerPort" in i for i in items) else "port"
    return _MERGE_KEYS.get(field or "")


def _json6902(obj: Object, op: dict[str, Any]) -> None:
    """Apply one RFC 6902 add/replace/remove operation (the ones k8s/ uses) in place."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        else:
            raise ValueError(f"JSON 6902 op {kind!r} at {op['path']} is not supported (add, replace, remove)")
        return
    if kind in ("add", "replace"):
        if kind == "replace" and last not in parent:
            raise ValueError(f"JSON 6902 replace of {op['path']}: no such field in {obj['metadata']['name']}")
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    else:
        raise ValueError(f"JSON 6902 op {kind!r} at {op['path']} is not supported (add, replace, remove)")
