"""The benchmark's --quick path end to end, so its code cannot rot: every phase, every table row, no timings.

`python -m bench --quick` on the test suite's small-checkpoint repository: the PyTorch baselines (seed-style
and same work), onnxruntime in-process, a real tritonserver over gRPC, the fast path served from the suite's
LCM repository, the levers and the load run, then the Markdown and JSON results. What is checked is that the
files exist and hold every row of every table, each ratio labelled with its baseline and each goal with its
CPU; speed is never asserted (DESIGN.md). The full benchmark (full-size models, hours on 2 cores) never runs
in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quick_results(demo_repository: Path, lcm_repository: Path, tmp_path_factory) -> tuple[str, dict, Path]:
    out = tmp_path_factory.mktemp("bench-results")
    cmd = [sys.executable, "-m", "bench", "--quick", "--repository", str(demo_repository),
           "--checkpoints", str(demo_repository.parent / "checkpoints"),
           "--fast-repository", str(lcm_repository),
           "--cache", str(tmp_path_factory.mktemp("bench-cache")), "--output", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (out / "quick.md").read_text(), json.loads((out / "quick.json").read_text()), out


def test_every_stage_row_for_every_scene(quick_results):
    md, js, _ = quick_results
    scenes = js["meta"]["scenes"]
    assert scenes == ["512x512", "1920x1080"]
    for scene in scenes:
        assert f"## Per stage, {scene} scene" in md
        rows = [r["row"] for r in js["tables"]["stages"][scene]]
        assert rows == [label for _, label in report.STAGE_ROWS] + [report.E2E_ROW]
        e2e = js["tables"]["stages"][scene][-1]
        assert all(e2e[f"{config}_ms"] for config, _ in report.CONFIGS), "every configuration ran end to end"
        assert all(e2e[f"{a}_over_{b}"] for a, b, _ in report.STAGE_RATIOS)
        # The seed-style baseline encodes the generated crop too; the others cut it by the person's mask.
        assert js["baseline"]["scenes"][scene]["encoder_runs"] == 2
        assert js["same_work"]["scenes"][scene]["encoder_runs"] == 1
        assert js["served"]["scenes"][scene]["encoder_runs"] == 1
        assert js["fast"]["scenes"][scene]["encoder_runs"] == 1
    for _, label in report.STAGE_ROWS:
        assert f"| {label} |" in md
    for *_, label in report.STAGE_RATIOS:
        assert f" {label} |" in md
    assert f"| {report.E2E_ROW} |" in md and f"| {report.ENCODES_ROW} |" in md


def test_every_goal_row(quick_results):
    md, js, _ = quick_results
    rows = {r["row"] for r in js["tables"]["goals"]}
    assert rows == set(report.GOAL_ROWS)
    for row in report.GOAL_ROWS:
        assert f"| {row} |" in md
    assert all(r["value"] is not None for r in js["tables"]["goals"]), "every ratio was measured"
    assert all("AVX-512" in r["cpu"] for r in js["tables"]["goals"]), "every goal names its CPU"
    assert js["fast"]["scheduler"] == "LCMScheduler"
    assert js["fast"]["sampling"] == {"steps": 4, "guidance": 1.0}
    for config, label in report.CONFIGS:
        assert f"- **{label}**" in md and js[config]["machine"]["cpu"]


def test_interactive_selection_rows_prove_the_cache(quick_results):
    md, js, _ = quick_results
    for scene, rows in [*js["tables"]["clicks"].items(), *js["tables"]["fast_clicks"].items()]:
        assert [r["row"] for r in rows] == list(report.CLICK_ROWS)
        runs = {r["row"]: r["encoder_runs"] for r in rows}
        assert runs["first click (cold)"] == 1
        assert runs["further click (cached)"] == 0, f"{scene}: a further click ran the SAM encoder"
        assert runs["generate after the clicks"] == 0, f"{scene}: compose encoded the generated crop"
    for row in report.CLICK_ROWS:
        assert f"| {row} |" in md


def test_every_lever_row(quick_results):
    md, js, out = quick_results
    names = [r["name"] for r in js["tables"]["levers"]]
    for lever in report.LEVER_ROWS:
        assert any(name.startswith(lever) for name in names), f"lever {lever!r} missing"
        assert f"| {lever}" in md
    assert (out / js["levers"]["scheduler_png"]).is_file()


def test_load_rows(quick_results):
    md, js, _ = quick_results
    assert report.LOAD_TITLE in md
    load = js["tables"]["load"]
    assert [r["concurrency"] for r in load] == [1, 2, 4]
    assert all(r["failed"] == 0 and r["sent"] > 0 for r in load)
