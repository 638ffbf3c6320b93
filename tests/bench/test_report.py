"""The benchmark report on hand-made phase results (no run): every ratio names its baseline, every goal its
CPU, and a fast path that could not run says why instead of a figure."""

from __future__ import annotations

from bench import report

SCENE = "512x512"
EPYC = {"cpu": "AMD EPYC", "cores": 2, "simd": "AVX2", "avx512": []}
XEON = {"cpu": "Intel Xeon", "cores": 2, "simd": "AVX-512", "avx512": ["avx512f"]}


def phase(machine: dict, e2e_s: float, encodes: int, **stages: float) -> dict:
    scene = {"e2e_p50_s": e2e_s, "e2e_s": [e2e_s], "stages_ms": stages, "encoder_runs": encodes}
    return {"machine": machine, "scenes": {SCENE: scene}}


def results(**phases: dict) -> dict:
    meta = {"profile": "full", "models": "m", "command": "python -m bench", "date": "d", "machine": "x",
            "software": "s", "settings": "st", "gpu": "g", "load": "l", "cores": 2, "scenes": [SCENE],
            "notes": []}
    return {"meta": meta, **phases}


def goals(res: dict) -> dict[str, dict]:
    return {row["row"]: row for row in report.goal_table(res)}


def test_ratios_name_their_baselines_and_goals_their_cpus():
    res = results(baseline=phase(EPYC, 120.0, 2), same_work=phase(EPYC, 90.0, 1, lama=900.0),
                  served=phase(XEON, 60.0, 1, lama=450.0), fast=phase(XEON, 15.0, 1))
    rows = goals(res)
    assert rows[report.GOAL_FAST]["value"] == 8.0 and rows[report.GOAL_FAST]["met"]
    assert rows[report.GOAL_SAME_WORK]["value"] == 1.5 and rows[report.GOAL_SAME_WORK]["met"]
    assert rows[report.INFO_SEED]["value"] == 2.0 and rows[report.INFO_SEED]["met"] is None
    # Phases from two hosts (a resumed run): both CPUs are named, with or without AVX-512.
    assert rows[report.GOAL_SAME_WORK]["cpu"] == ("AMD EPYC, 2 cores, no AVX-512 (AVX2) / "
                                                  "Intel Xeon, 2 cores, AVX-512")
    stage = {r["key"]: r for r in report.stage_table(res, SCENE)}
    assert stage["lama"]["same_work_over_served"] == 2.0
    assert stage["e2e"]["baseline_over_fast"] == 8.0
    md = report.markdown(res)
    for *_, label in report.STAGE_RATIOS:
        assert label in md
    assert f"| {report.ENCODES_ROW} | 2 | 1 | — | 1 | 1 |" in md


def test_a_fast_path_that_could_not_run_says_why():
    why = "skipped: SAM vit_t (MobileSAM) is not exportable by this version of isekai"
    res = results(baseline=phase(EPYC, 120.0, 2), same_work=phase(EPYC, 90.0, 1), served=phase(EPYC, 60.0, 1),
                  fast={"skipped": why})
    rows = goals(res)
    for row in (report.GOAL_FAST, report.GOAL_FAST_CLICK):
        assert rows[row]["value"] is None and rows[row]["shown"] == "skipped" and rows[row]["met"] is None
    md = report.markdown(res)
    assert why in md and md.count(why) >= 2  # the configurations list and the click section
