"""Configuration 2: the exported ONNX graphs in this process with onnxruntime (no Triton), same pipeline
logic.

Like the served ensemble, LaMa runs beside the diffusion (so configuration 3 against this one is like with
like); one more swap per scene runs them one after the other, for the lever that says what the parallel
branches buy.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from bench.onnx_pipeline import OnnxPipeline
from bench.timing import StageTimer, median, say
from isekai.ensemble.diffusion import DiffusionOptions


def step_progress(label: str):
    """A diffusion progress callback that prints a few lines per loop (every step would flood the log)."""
    started = [time.perf_counter()]

    def progress(step: int, total: int) -> None:
        if step == 1 or step == total or step % max(1, total // 4) == 0:
            per = (time.perf_counter() - started[0]) / step
            say(f"{label}: denoising step {step}/{total} ({per:.2f} s/step)")

    return progress


def save_inputs(path: Path, scene, out) -> None:
    """What the levers phase re-runs stages on: this scene's LaMa inputs, hole, person crop and character."""
    p = out.prepared
    np.savez(path, rgb=scene.rgb, hole=p.hole, lama_image=p.lama_image, lama_mask=p.lama_mask,
             person_image=p.person_image, character=out.character)


def run(models, scenes, options: DiffusionOptions, runs: int, warmup: DiffusionOptions, workdir: Path,
        nonce: str) -> dict:
    say(f"onnxruntime: creating sessions for the exported graphs in {models.repository}")
    started = time.perf_counter()
    pipe = OnnxPipeline(models.repository)
    result: dict = {"session_create_s": time.perf_counter() - started, "scenes": {}}
    say(f"onnxruntime: sessions ready in {result['session_create_s']:.0f} s; warm-up swap")
    pipe.swap(scenes[0].png(f"{nonce}-warmup"), scenes[0].click, warmup, StageTimer())
    for scene in scenes:
        e2e, timer = [], StageTimer()
        for i in range(runs):
            label = f"onnxruntime {scene.name} swap {i + 1}/{runs}"
            run_timer = StageTimer()
            t0 = time.perf_counter()
            out = pipe.swap(scene.png(f"{nonce}-{i}"), scene.click, options, run_timer, step_progress(label))
            e2e.append(time.perf_counter() - t0)
            timer.merge(run_timer)
            say(f"{label} took {e2e[-1]:.1f} s")
            if i == 0:
                save_inputs(workdir / f"inputs-{scene.name}.npz", scene, out)
        p = out.prepared
        label = f"onnxruntime {scene.name} sequential swap (LaMa, then the diffusion)"
        t0 = time.perf_counter()
        pipe.swap(scene.png(f"{nonce}-sequential"), scene.click, options, StageTimer(), step_progress(label),
                  parallel=False)
        sequential = time.perf_counter() - t0
        say(f"{label} took {sequential:.1f} s")
        result["scenes"][scene.name] = {
            "e2e_s": e2e, "e2e_p50_s": median(e2e), "stages_ms": timer.per_call_ms(),
            "sequential_e2e_s": sequential, "encoder_runs": len(timer.calls["sam_encoder"]) // runs,
            "mask_fraction": float(p.mask.mean()),
            "person_crop": list(p.person_image.shape[:2]), "lama_input": list(p.lama_image.shape[2:]),
        }
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result
