"""bench/server_memory.py on the test suite's small checkpoints, so its code cannot rot: three real servers,
one swap each, and the files it writes hold every configuration and every process; memory is never asserted
(DESIGN.md), only that it was measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.server_memory import CONFIGURATIONS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_server_memory_table(demo_repository: Path, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.server_memory", "--quick", "--steps", "2",
           "--repository", str(demo_repository), "--checkpoints", str(demo_repository.parent / "checkpoints"),
           "--cache", str(tmp_path / "cache"), "--results", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    md = (out / "server-memory-tiny.md").read_text()
    result = json.loads((out / "server-memory-tiny.json").read_text())
    rows = result["configurations"]
    assert [r["name"] for r in rows] == [c.name for c in CONFIGURATIONS]
    assert [r["attention_slicing"] for r in rows] == ["none", "head", "head"]
    for r in rows:
        assert f"| {r['name']} |" in md
        assert 0 < r["loaded_bytes"] <= r["peak_bytes"], "sampled before and during the swap"
        assert r["unet_steps"] > 0, "the swap found the person and ran the diffusion"
        # Every model's stub and the server itself, each with its own peak.
        assert {"tritonserver", "unet", "sam_encoder", "diffusion"} <= set(r["anon_peak_bytes"])
    assert result["machine"]["simd"] in md  # which CPU the figures came from
    # The "before" row ran the UNet exported without slicing: a graph of its own, the rest shared.
    before = Path(result["repositories"][0])
    assert before != demo_repository and (before / "unet" / "1" / "model.onnx").exists()
