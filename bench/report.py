"""The benchmark's tables, as Markdown and as JSON, from the phases' results.

Row labels are constants here: the smoke test (tests/bench/test_bench_quick.py) checks that every one of them is
in both files, so a table cannot lose a row silently.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS = (("baseline", "1 PyTorch baseline"), ("onnxruntime", "2 onnxruntime in-process"),
           ("served", "3 Triton ensemble (gRPC)"))

# (key in the phases' stage timings, row label)
STAGE_ROWS = (
    ("sam_encoder", "SAM encoder (per call; a swap makes 2)"),
    ("sam_decoder", "SAM decoder (per call)"),
    ("lama", "LaMa"),
    ("unet_step", "one UNet step (batch 2: guidance)"),
    ("vae_encoder", "VAE encoder"),
    ("vae_decoder", "VAE decoder"),
    ("text_encoder", "text encoder (the prompt, per call)"),
    ("compose", "compose (without its SAM calls)"),
)
E2E_ROW = "end-to-end p50"
# The served phase's compose time with the SAM calls Triton counts inside it (bench/served.py: why no own row).
COMPOSE_WITH_SAM_CALLS = "compose_with_sam_calls"

GOAL_E2E = "served end-to-end vs baseline 1"
GOAL_CLICK = "second click vs first click (served)"
GOAL_FLOPS = "UNet step FLOP/s vs matmul peak"
GOAL_OVERHEAD = "Triton overhead: 3 vs 2"
GOAL_RSS = "server peak RSS vs bytes of weights loaded"
INFO_AFTER_CLICKS = "served generate after the clicks vs baseline 1"
GOAL_ROWS = (GOAL_E2E, GOAL_CLICK, GOAL_FLOPS, GOAL_OVERHEAD, GOAL_RSS, INFO_AFTER_CLICKS)

CLICK_ROWS = ("first click (cold)", "further click (cached)", "generate after the clicks", "generate, new photo (cold)")

# Levers measured by the served phase (the others are bench/levers.py's rows).
LEVER_BATCHING = "unet dynamic batching (2 concurrent requests)"
LEVER_BATCHING_SWAPS = "unet dynamic batching in 2 concurrent swaps"
LEVER_CACHE_CLICK = "embedding cache: further click"
LEVER_CACHE_GENERATE = "embedding cache: generate after the clicks"
LEVER_ROWS = (
    "ORT intra-op threads",
    "ORT graph optimization: all vs disabled",
    "ORT graph optimization: all vs basic",
    "ORT graph optimization: all vs extended",
    "ORT memory arena (lama)",
    "ORT memory arena (sam_encoder)",
    "LaMa FFT as matmul",
    "LaMa on a crop around the mask",
    "CFG as one batch-2 UNet call",
    "diffusion on the person crop (512 long side)",
    "ORT graph optimization on the UNet: all vs basic",
    "scheduler: DPM-Solver++ vs PNDM 50",
    "IO binding / DLPack between BLS calls",
    LEVER_BATCHING,
    LEVER_BATCHING_SWAPS,
    LEVER_CACHE_CLICK,
    LEVER_CACHE_GENERATE,
)
LOAD_TITLE = "Load: isekai_segment clicks from concurrent clients"


def _t(ms: float | None) -> str:
    """A duration in ms, written in the unit that reads best."""
    if ms is None:
        return "—"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def _x(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _scene(results: dict, config: str, scene: str) -> dict:
    return results.get(config, {}).get("scenes", {}).get(scene, {})


def stage_table(results: dict, scene: str) -> list[dict]:
    rows = []
    for key, label in STAGE_ROWS:
        values = {c: _scene(results, c, scene).get("stages_ms", {}).get(key) for c, _ in CONFIGS}
        rows.append({"row": label, "key": key, **{f"{c}_ms": v for c, v in values.items()},
                     "speedup_1_vs_3": _ratio(values["baseline"], values["served"])})
    e2e = {c: _scene(results, c, scene).get("e2e_p50_s") for c, _ in CONFIGS}
    rows.append({"row": E2E_ROW, "key": "e2e", **{f"{c}_ms": (v * 1e3 if v else None) for c, v in e2e.items()},
                 "speedup_1_vs_3": _ratio(e2e["baseline"], e2e["served"])})
    return rows


def goal_table(results: dict) -> list[dict]:
    rows = []
    served = results.get("served", {})
    for scene in results["meta"]["scenes"]:
        base = _scene(results, "baseline", scene).get("e2e_p50_s")
        srv = _scene(results, "served", scene).get("e2e_p50_s")
        value = _ratio(base, srv)
        rows.append({"row": GOAL_E2E, "scene": scene, "value": value, "shown": _x(value), "goal": ">= 1.3x",
                     "met": None if value is None else value >= 1.3})
    for scene in results["meta"]["scenes"]:
        clicks = _scene(results, "served", scene).get("clicks", {})
        value = _ratio(clicks.get("first_click_s"), clicks.get("further_click_p50_s"))
        rows.append({"row": GOAL_CLICK, "scene": scene, "value": value, "shown": _x(value, 0), "goal": ">= 20x",
                     "met": None if value is None else value >= 20})
    flops = results.get("flops", {})
    value = flops.get("served_fraction")
    rows.append({"row": GOAL_FLOPS, "scene": flops.get("scene"), "value": value,
                 "shown": "—" if value is None else f"{100 * value:.0f} %", "goal": ">= 70 %",
                 "met": None if value is None else value >= 0.7})
    for scene in results["meta"]["scenes"]:
        ort = _scene(results, "onnxruntime", scene).get("e2e_p50_s")
        srv = _scene(results, "served", scene).get("e2e_p50_s")
        value = srv / ort - 1 if ort and srv else None
        rows.append({"row": GOAL_OVERHEAD, "scene": scene, "value": value,
                     "shown": "—" if value is None else f"{100 * value:+.1f} %", "goal": "<= 3 %",
                     "met": None if value is None else value <= 0.03})
    memory = served.get("memory", {})
    value = _ratio(memory.get("peak_rss_bytes"), memory.get("weight_bytes"))
    rows.append({"row": GOAL_RSS, "scene": None, "value": value, "shown": _x(value), "goal": "<= 1.3x",
                 "met": None if value is None else value <= 1.3})
    for scene in results["meta"]["scenes"]:
        base = _scene(results, "baseline", scene).get("e2e_p50_s")
        after = _scene(results, "served", scene).get("clicks", {}).get("generate_after_clicks_s")
        value = _ratio(base, after)
        rows.append({"row": INFO_AFTER_CLICKS, "scene": scene, "value": value, "shown": _x(value),
                     "goal": "(info: the real flow)", "met": None})
    return rows


def click_table(results: dict, scene: str) -> list[dict]:
    s = _scene(results, "served", scene)
    c = s.get("clicks", {})
    ms = (lambda v: None if v is None else v * 1e3)
    return [
        {"row": CLICK_ROWS[0], "ms": ms(c.get("first_click_s")), "encoder_runs": c.get("first_click_encoder_runs")},
        {"row": CLICK_ROWS[1], "ms": ms(c.get("further_click_p50_s")),
         "encoder_runs": c.get("further_click_encoder_runs")},
        {"row": CLICK_ROWS[2], "ms": ms(c.get("generate_after_clicks_s")),
         "encoder_runs": c.get("generate_after_clicks_encoder_runs")},
        {"row": CLICK_ROWS[3], "ms": ms(s.get("e2e_p50_s")), "encoder_runs": 2 if s else None},
    ]


def lever_rows(results: dict) -> list[dict]:
    rows = list(results.get("levers", {}).get("rows", []))
    served = results.get("served", {})
    batching = served.get("unet_batching")
    if batching:
        seq, con = batching["sequential"], batching["concurrent"]
        rows.append({"name": LEVER_BATCHING, "measure": "two batch-2 unet requests (one step of two swaps), Triton",
                     "a_label": f"concurrent: {con['executions']} execution(s)", "a": con["s"],
                     "b_label": f"one after the other: {seq['executions']} executions", "b": seq["s"], "unit": "s",
                     "verdict": _batching_verdict(con, seq)})
    swaps = served.get("concurrent_swaps")
    if swaps:
        rows.append({"name": LEVER_BATCHING_SWAPS, "measure": f"two isekai swaps at once: unet ran {swaps['unet_requests']} "
                     f"steps in {swaps['unet_executions']} executions", "a_label": "both swaps, wall time",
                     "a": swaps["s"], "b_label": "", "b": None, "unit": "s",
                     "verdict": "their steps batched" if swaps["unet_executions"] < swaps["unet_requests"] else
                     "their steps did not batch: each swap's next step arrives while the other's runs, after the "
                     "2 ms queue delay; on a CPU a longer delay would buy nothing (see the row above)"})
    first = results["meta"]["scenes"][0] if results["meta"]["scenes"] else None
    clicks = _scene(results, "served", first).get("clicks", {}) if first else {}
    if clicks:
        rows.append({"name": LEVER_CACHE_CLICK, "measure": f"isekai_segment, {first}", "a_label": "cached embedding",
                     "a": clicks["further_click_p50_s"], "b_label": "first click (encodes)",
                     "b": clicks["first_click_s"], "unit": "s", "verdict": "kept (preprocess/config.pbtxt cache)"})
        rows.append({"name": LEVER_CACHE_GENERATE, "measure": f"isekai after isekai_segment, {first}",
                     "a_label": "after the clicks (1 SAM encode: the silhouette)", "a": clicks["generate_after_clicks_s"],
                     "b_label": "new photo (2 SAM encodes)", "b": _scene(results, "served", first).get("e2e_p50_s"),
                     "unit": "s", "verdict": "kept"})
    return rows


def _batching_verdict(concurrent: dict, sequential: dict) -> str:
    if concurrent["executions"] >= sequential["executions"]:
        return "the pair was not batched"
    if concurrent["s"] > sequential["s"] * 0.95:
        return ("batched, but no faster on a CPU (a batch-4 step costs what two batch-2 steps do); kept for GPUs, "
                "where a bigger batch costs little more (unet/config.pbtxt dynamic_batching)")
    return "kept: batched and faster (unet/config.pbtxt dynamic_batching)"


def _fmt_lever_value(value, unit: str) -> str:
    if value is None:
        return "—"
    return _t(value * 1e3) if unit == "s" else f"{value:.3g} {unit}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"# isekai benchmark: {meta['profile']} ({meta['models']})", "",
           f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ",
           f"Machine: {meta['machine']}  ", f"Software: {meta['software']}  ",
           f"Settings: {meta['settings']}  ", f"GPU: {meta['gpu']}  ",
           f"Machine load (1-min load average at each phase's start/end; the cores were shared with other work "
           f"where it exceeds the phase's own ~{meta['cores']}): {meta['load']}", ""]
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    out += ["", "## Goals", "", "| measure | scene | value | goal | met |", "| --- | --- | ---: | --- | --- |"]
    for r in goal_table(results):
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        out.append(f"| {r['row']} | {r['scene'] or ''} | {r['shown']} | {r['goal']} | {met} |")
    memory = results.get("served", {}).get("memory", {})
    if memory:
        gib = 2**30
        out += ["", f"Server memory: peak {memory['peak_rss_bytes'] / gib:.1f} GiB, tritonserver and its "
                f"{memory['processes'] - 1} Python-backend stubs sampled every 0.5 s (anonymous memory of each, half "
                "of the shared tensor memory each stub shares with tritonserver, the largest set of shared "
                f"libraries); at the end {memory.get('pss_bytes', 0) / gib:.1f} GiB (PSS). Weights loaded: "
                f"{memory['weight_bytes'] / gib:.1f} GiB (the exported graphs). The sum of each process's own "
                f"peak, an upper bound: {memory['sum_of_process_peaks_bytes'] / gib:.1f} GiB."]
    flops = results.get("flops", {})
    if flops:
        out += ["", f"UNet step: {flops['step_flops'] / 1e12:.2f} TFLOP (batch 2, latent "
                f"{flops['latent'][0]}x{flops['latent'][1]}, convolutions and matmuls); matmul peak "
                f"{flops['peak_gflops']:.0f} GFLOP/s (float32 {flops.get('peak_size', '')}-square matmul on {meta['cores']} "
                f"cores, the best library at the run's start and end: "
                + "; ".join(", ".join(f"{k} {v:.0f}" for k, v in p.items()) for p in flops["peaks"])
                + "); achieved: "
                + ", ".join(f"{name} {v:.0f} GFLOP/s" for name, v in flops.get("achieved_gflops", {}).items())]
    for scene in meta["scenes"]:
        out += ["", f"## Per stage, {scene} scene", "",
                "| stage | " + " | ".join(label for _, label in CONFIGS) + " | 1 vs 3 |",
                "| --- | ---: | ---: | ---: | ---: |"]
        for r in stage_table(results, scene):
            cells = " | ".join(_t(r[f"{c}_ms"]) for c, _ in CONFIGS)
            out.append(f"| {r['row']} | {cells} | {_x(r['speedup_1_vs_3'])} |")
        runs = {c: len(_scene(results, c, scene).get("e2e_s", [])) for c, _ in CONFIGS}
        out.append("")
        out.append(f"End-to-end over {', '.join(f'{n} runs ({c})' for c, n in runs.items())}; per-stage values are "
                   "medians per call (Triton: its statistics' compute time per execution).")
        with_sam = _scene(results, "served", scene).get("stages_ms", {}).get(COMPOSE_WITH_SAM_CALLS)
        if with_sam is not None:
            out.append(f"Served compose is not split out: Triton counts the silhouette's SAM calls inside it "
                       f"({_t(with_sam)} with them), and a swap's two SAM encoder calls differ by more than "
                       "compose's own work, so no subtraction resolves it; the end-to-end row includes it.")
    out += ["", "## Interactive selection (issue 8)", ""]
    for scene in meta["scenes"]:
        out += [f"{scene} scene:", "", "| request | time | SAM encoder runs |", "| --- | ---: | ---: |"]
        for r in click_table(results, scene):
            out.append(f"| {r['row']} | {_t(r['ms'])} | {'—' if r['encoder_runs'] is None else r['encoder_runs']} |")
        out.append("")
    out += ["## Levers", "", "| lever | measured | default | time | alternative | time | verdict |",
            "| --- | --- | --- | ---: | --- | ---: | --- |"]
    for r in lever_rows(results):
        out.append(f"| {r['name']} | {r['measure']} | {r['a_label']} | {_fmt_lever_value(r['a'], r['unit'])} | "
                   f"{r['b_label']} | {_fmt_lever_value(r['b'], r['unit'])} | {r['verdict']} |")
    png = results.get("levers", {}).get("scheduler_png")
    if png:
        out += ["", f"Scheduler outputs side by side (person crop, DPM-Solver++, PNDM 50; random weights draw noise): "
                f"![schedulers]({png})"]
    load = results.get("served", {}).get("load", [])
    out += ["", f"## {LOAD_TITLE}", "",
            "`isekai.client.load.run_load` against the same server (each photo clicked once first, so these are the "
            "cached clicks of the interactive loop); Triton's queue vs compute time per model from its metrics "
            "endpoint over each run.", "",
            "| concurrency | requests | failed | req/s | p50 | p95 | p99 |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in load:
        out.append(f"| {r['concurrency']} | {r['sent']} | {r['failed']} | {r['throughput_rps']:.2f} | "
                   f"{_t(r['p50_ms'])} | {_t(r['p95_ms'])} | {_t(r['p99_ms'])} |")
    for r in load:
        out += ["", f"concurrency {r['concurrency']}:", "",
                "| model | requests | executions | queue ms/request | compute ms/request |",
                "| --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {m['model']} | {m['requests']} | {m['executions']} | {m['queue_ms']:.1f} | {m['compute_ms']:.1f} |"
                for m in r["models"]]
    return "\n".join(out) + "\n"


def write(results: dict, output: Path, stem: str) -> tuple[Path, Path]:
    """``<output>/<stem>.md`` and ``<output>/<stem>.json`` (raw results plus the tables as rows)."""
    output.mkdir(parents=True, exist_ok=True)
    tables = {
        "goals": goal_table(results),
        "stages": {scene: stage_table(results, scene) for scene in results["meta"]["scenes"]},
        "clicks": {scene: click_table(results, scene) for scene in results["meta"]["scenes"]},
        "levers": lever_rows(results),
        "load": results.get("served", {}).get("load", []),
    }
    md, js = output / f"{stem}.md", output / f"{stem}.json"
    md.write_text(markdown(results))
    js.write_text(json.dumps({**results, "tables": tables}, indent=2, default=float))
    return md, js


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report RESULTS.json``: write RESULTS.md again from a run's JSON (after editing the report)."""
    import sys  # noqa: PLC0415

    (path,) = argv if argv is not None else sys.argv[1:]
    path = Path(path)
    results = {k: v for k, v in json.loads(path.read_text()).items() if k != "tables"}
    md, js = write(results, path.parent, path.stem)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
