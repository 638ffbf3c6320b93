"""bench/sam_encoders.py and bench/sam_memory.py on the test-size ViT SAM, so their code cannot rot: the files
they write hold every row; speed and memory are never asserted (DESIGN.md). One cache for both: the graph the
served default uses is exported once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from isekai import constants as C

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sam-bench-cache")


def _run(module: str, cache: Path, out: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", module, "--quick", "--cache", str(cache), "--results", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_sam_memory_levers_table(cache, tmp_path):
    _run("bench.sam_memory", cache, tmp_path, "--rows", str(C.SAM_EMBEDDING_SIZE), "--runs", "1")
    md = (tmp_path / "sam-memory-tiny.md").read_text()
    result = json.loads((tmp_path / "sam-memory-tiny.json").read_text())
    names = [lever["name"] for lever in result["levers"]]
    assert names == [
        f"global attention, {C.SAM_ATTENTION_QUERY_ROWS} query rows per block vs {C.SAM_EMBEDDING_SIZE}",
        "onnxruntime memory arena", "onnxruntime memory pattern", "MatMul weight prepacking",
        "intra-op threads", "glibc malloc mmap threshold",
    ]
    assert all(f"| {name} |" in md for name in names)
    assert result["machine"]["simd"] in md  # every figure says which CPU it came from
    assert "x its" in md and "of weights" in md


@pytest.mark.e2e
def test_sam_encoders_tables(cache, tmp_path):
    _run("bench.sam_encoders", cache, tmp_path, "--types", "tiny", "--served", "tiny", "--runs", "1",
         "--clicks", "1")
    md = (tmp_path / "sam-encoders-quick.md").read_text()
    result = json.loads((tmp_path / "sam-encoders-quick.json").read_text())
    assert "| tiny |" in md and "cold click (new photo, 1 encode), median of 1" in md
    served = result["served"]
    assert served["cold_clicks"][0]["models"][C.SAM_ENCODER_MODEL]["runs"] == 1  # a new photo: one encode
    assert C.SAM_ENCODER_MODEL not in served["cached_click"]["models"]  # a cached photo: the decoder only
