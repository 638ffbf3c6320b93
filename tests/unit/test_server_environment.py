"""The environment the embedded server gives tritonserver and its stubs (isekai/serving/server.py): the
project's Python first on PATH, and glibc's mmap threshold fixed unless the caller chose one."""

from __future__ import annotations

import sys
from pathlib import Path

from isekai import constants as C
from isekai.serving.server import ServerOptions, TritonInstall

INSTALL = TritonInstall(binary=Path("/nonexistent/tritonserver"), backend_dir=Path("/nonexistent/backends"))


def test_the_mmap_threshold_is_fixed_by_default(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    env = ServerOptions(repository="model_repository").environment(INSTALL)
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(C.MALLOC_MMAP_THRESHOLD)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_the_callers_threshold_wins_and_none_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    assert ServerOptions(repository="r").environment(INSTALL)["MALLOC_MMAP_THRESHOLD_"] == "4194304"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    env = ServerOptions(repository="r", malloc_mmap_threshold=None).environment(INSTALL)
    assert "MALLOC_MMAP_THRESHOLD_" not in env
