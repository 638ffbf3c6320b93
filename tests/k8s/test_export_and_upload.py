"""k8s/export-and-upload.sh: the upload half, run for real against a local folder and against stand-ins for
the cloud command lines (aws, gsutil, az, kubectl) that record what they were asked to do.

The export half runs the same ``isekai export`` commands the README documents; their own tests cover them.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.k8s.tiny_repository import SLEEPER, write_tiny_repository

SCRIPT = ROOT / "k8s" / "export-and-upload.sh"

# Records its arguments (one per line) and, for a `kubectl exec -i ... tar`, the archive on its stdin.
_STAND_IN = """#!/usr/bin/env bash
printf '%s\\n' "$@" >> "$RECORD/$(basename "$0").args"
echo --- >> "$RECORD/$(basename "$0").args"
case " $* " in
    *" tar -xf - "*) cat > "$RECORD/upload.tar" ;;
    *" apply -f - "*) cat > "$RECORD/pod.yaml" ;;
esac
"""


@pytest.fixture
def repository(tmp_path) -> Path:
    repo = write_tiny_repository(tmp_path / "repository")
    cache = repo / SLEEPER / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"not uploaded")
    return repo


def run(repository: Path, tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    record = tmp_path / "record"
    bin_dir = tmp_path / "bin"
    record.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    for tool in ("aws", "gsutil", "az", "kubectl"):
        (bin_dir / tool).write_text(_STAND_IN)
        (bin_dir / tool).chmod(0o755)
    checkpoints = ("SAM_CHECKPOINT", "LAMA_CHECKPOINT", "LAMA_CONFIG", "SD_MODEL")
    environment = {k: v for k, v in os.environ.items() if k not in checkpoints}
    environment.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        RECORD=str(record),
        REPOSITORY=str(repository),
        **env,
    )
    result = subprocess.run(
        ["bash", str(SCRIPT), *args],
        check=False,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    return result, record


def recorded(record: Path, tool: str) -> list[str]:
    return (record / f"{tool}.args").read_text().splitlines()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_upload_to_a_path_mirrors_the_repository_without_python_caches(repository, tmp_path):
    destination = tmp_path / "mounted" / "models"
    result, _ = run(repository, tmp_path, "--upload-only", str(destination))
    assert result.returncode == 0, result.stderr
    expected = {f for f in files_under(repository) if "__pycache__" not in f}
    assert files_under(destination) == expected
    assert (destination / SLEEPER / "configs" / "gpu.pbtxt").read_text() == (
        repository / SLEEPER / "configs" / "gpu.pbtxt"
    ).read_text()


@pytest.mark.parametrize(
    ("destination", "tool", "expected"),
    [
        (
            "s3://bucket/isekai/repo",
            "aws",
            ["s3", "sync", "{repo}", "s3://bucket/isekai/repo", "--delete", "--exclude", "*__pycache__/*"],
        ),
        (
            "gs://bucket/isekai/repo",
            "gsutil",
            ["-m", "rsync", "-r", "-d", "-x", ".*__pycache__/.*", "{repo}", "gs://bucket/isekai/repo"],
        ),
        (
            "as://account/models/isekai",
            "az",
            [
                "storage",
                "blob",
                "sync",
                "--account-name",
                "account",
                "--container",
                "models",
                "--source",
                "{repo}",
                "--destination",
                "isekai",
                "--delete-destination",
                "true",
                "--exclude-pattern",
                "*__pycache__*",
            ],
        ),
    ],
)
def test_upload_to_object_storage_mirrors_with_the_clouds_sync_command(
    repository, tmp_path, destination, tool, expected
):
    result, record = run(repository, tmp_path, "--upload-only", destination)
    assert result.returncode == 0, result.stderr
    # a mirror (deletes what the repository no longer has) that skips Python caches
    assert recorded(record, tool) == [e.replace("{repo}", str(repository)) for e in expected] + ["---"]


def test_upload_to_a_volume_claim_streams_the_repository_into_a_pod_that_mounts_it(repository, tmp_path):
    result, record = run(repository, tmp_path, "--upload-only", "pvc://serving/isekai-models")
    assert result.returncode == 0, result.stderr
    calls = " ".join(recorded(record, "kubectl")).split(" --- ")
    assert calls[0].startswith("-n serving apply -f -")
    assert "claimName: isekai-models" in (record / "pod.yaml").read_text()
    assert any(c.startswith("-n serving wait --for=condition=Ready") for c in calls)
    assert any(c.startswith("-n serving delete pod") for c in calls), "the helper pod is removed"
    with tarfile.open(fileobj=io.BytesIO((record / "upload.tar").read_bytes())) as archive:
        uploaded = {m.name.removeprefix("./") for m in archive.getmembers() if m.isfile()}
    assert uploaded == {f for f in files_under(repository) if "__pycache__" not in f}


def test_export_without_checkpoints_names_what_is_missing(repository, tmp_path):
    result, _ = run(repository, tmp_path, "s3://bucket/repo")
    assert result.returncode == 2
    for var in ("SAM_CHECKPOINT", "LAMA_CHECKPOINT", "LAMA_CONFIG", "SD_MODEL"):
        assert var in result.stderr


def test_an_unknown_destination_scheme_is_refused(repository, tmp_path):
    result, _ = run(repository, tmp_path, "--upload-only", "ftp://host/models")
    assert result.returncode == 2
    assert "unsupported destination ftp://host/models" in result.stderr
