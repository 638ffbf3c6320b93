"""isekai_stream's plumbing without a server: the isekai ensemble's steps as a plan, run in dependency order
with independent steps in parallel, the progress fraction, the latent preview, and the loop's hooks that
stream and
cancel."""

from __future__ import annotations

import io
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from isekai import constants as C
from isekai.ensemble.diffusion import DiffusionOptions, img2img
from isekai.ensemble.preview import is_preview_step, latents_to_rgb, preview_png
from isekai.ensemble.requests import precheck_swap, validate_swap
from isekai.serving.ensemble_steps import EnsemblePlan, StreamProgress, run_plan
from tests.unit.test_configs import REPOSITORY
from tests.unit.test_diffusion import RecordingUNet, fake_models, smooth_image

ISEKAI = REPOSITORY / C.ENSEMBLE_MODEL / "config.pbtxt"


@pytest.fixture(scope="module")
def plan() -> EnsemblePlan:
    return EnsemblePlan.load(ISEKAI)


def test_plan_is_the_isekai_ensemble(plan):
    assert plan.name == C.ENSEMBLE_MODEL
    assert [s.model for s in plan.steps] == [
        C.PREPROCESS_MODEL, C.SAM_DECODER_MODEL, C.PREPARE_MODEL, C.LAMA_MODEL, C.DIFFUSION_MODEL,
        C.COMPOSE_MODEL, C.FINISH_MODEL,
    ]
    index = {s.model: i for i, s in enumerate(plan.steps)}
    deps = plan.dependencies()
    # LaMa and diffusion read only prepare's (and preprocess's) tensors: they can run at the same time.
    assert index[C.LAMA_MODEL] not in deps[index[C.DIFFUSION_MODEL]]
    assert index[C.DIFFUSION_MODEL] not in deps[index[C.LAMA_MODEL]]
    assert {index[C.LAMA_MODEL], index[C.DIFFUSION_MODEL]} <= deps[index[C.COMPOSE_MODEL]]
    order = plan.order()
    assert sorted(order) == list(range(len(plan.steps)))
    assert all(order.index(d) < order.index(i) for i, ds in enumerate(deps) for d in ds)


def test_plan_refuses_a_step_that_reads_what_nothing_writes():
    text = ISEKAI.read_text().replace('value: "_person_crop" }\n      input_map { key: "found"',
                                      'value: "_nobody" }\n      input_map { key: "found"', 1)
    assert "_nobody" in text
    with pytest.raises(ValueError, match="reads '_nobody', which nothing writes"):
        EnsemblePlan.parse(text)


def fake_call(plan, log, delays=None, fail=None):
    """A call that writes every output as a string naming its step and records start and end times."""
    lock = threading.Lock()

    def call(step, args):
        with lock:
            log.append(("start", step.model, time.perf_counter(), sorted(args)))
        time.sleep((delays or {}).get(step.model, 0.0))
        if step.model == fail:
            raise ValueError(f"{step.model}: refused")
        with lock:
            log.append(("end", step.model, time.perf_counter(), None))
        return {key: f"{step.model}.{key}" for key in step.outputs}

    return call


def test_run_plan_follows_dependencies_and_overlaps_lama_and_diffusion(plan):
    log: list = []
    inputs = {"image": "img", "points": "pts", "labels": "lbl"}  # optional inputs left out
    out = run_plan(plan, inputs, fake_call(plan, log, {C.LAMA_MODEL: 0.3, C.DIFFUSION_MODEL: 0.3}))
    assert out == {"result": "finish.result", "mask": "prepare.mask", "background": "compose.background",
                   "score": "prepare.score"}
    times = {(kind, model): t for kind, model, t, _ in log}
    for i, deps in enumerate(plan.dependencies()):
        for d in deps:
            assert times[("end", plan.steps[d].model)] <= times[("start", plan.steps[i].model)]
    lama = (times[("start", C.LAMA_MODEL)], times[("end", C.LAMA_MODEL)])
    diffusion = (times[("start", C.DIFFUSION_MODEL)], times[("end", C.DIFFUSION_MODEL)])
    assert lama[0] < diffusion[1] and diffusion[0] < lama[1], "LaMa and diffusion did not overlap"
    # Absent optional inputs are absent for the step too, as in Triton's ensemble.
    args = {model: names for kind, model, _, names in log if kind == "start"}
    assert args[C.PREPROCESS_MODEL] == ["image", "labels", "points"]


def test_run_plan_raises_the_first_failure_and_starts_nothing_after_it(plan):
    log: list = []
    with pytest.raises(ValueError, match="preprocess: refused"):
        run_plan(plan, {"image": "x"}, fake_call(plan, log, fail=C.PREPROCESS_MODEL))
    assert [model for kind, model, *_ in log if kind == "start"] == [C.PREPROCESS_MODEL]


def test_hooks_see_every_step_start_and_end(plan):
    seen: list = []
    run_plan(plan, {}, fake_call(plan, []), on_start=lambda s: seen.append(("start", s.model)),
             on_end=lambda s: seen.append(("end", s.model)))
    for step in plan.steps:
        assert seen.index(("start", step.model)) < seen.index(("end", step.model))
    assert len(seen) == 2 * len(plan.steps)


def test_progress_never_decreases_and_ends_at_one(plan):
    progress = StreamProgress(plan, denoising_steps=18)
    values = [progress.current()]
    for model in (C.PREPROCESS_MODEL, C.SAM_DECODER_MODEL, C.PREPARE_MODEL):
        values.append(progress.step_done(model))
    for step in range(1, 4):  # the loop says it runs 3 steps, not the 18 estimated: never backwards
        values.append(progress.denoised_to(step, 3))
    values.append(progress.step_done(C.LAMA_MODEL))
    for model in (C.DIFFUSION_MODEL, C.COMPOSE_MODEL, C.FINISH_MODEL):
        values.append(progress.step_done(model))
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False)), values
    assert len(set(values[4:7])) == 3, "each UNet step moves the bar"


def test_latents_map_to_rgb_linearly():
    latents = np.zeros((1, 4, 6, 8), np.float32)
    assert latents_to_rgb(latents).shape == (6, 8, 3)
    assert (latents_to_rgb(latents) == 128).all()  # 0 -> the middle grey
    latents[0, 0] = 1.0
    expected = np.round((np.clip(np.asarray(C.SD_LATENT_RGB_FACTORS[0]), -1, 1) + 1) / 2 * 255)
    np.testing.assert_array_equal(latents_to_rgb(latents)[0, 0], expected)
    png = Image.open(io.BytesIO(preview_png(latents)))
    assert png.format == "PNG" and png.size == (8, 6)
    with pytest.raises(ValueError, match="latents should be"):
        latents_to_rgb(np.zeros((1, 3, 6, 8), np.float32))


@pytest.mark.parametrize(("total", "steps"), [(1, [1]), (5, [2, 4, 5]), (4, [2, 4])])
def test_preview_every_few_steps_and_after_the_last(total, steps):
    assert [s for s in range(1, total + 1) if is_preview_step(s, total, every=2)] == steps


def test_loop_hands_out_latents_and_stops_when_progress_raises():
    class Stop(Exception):
        pass

    latents_seen: list = []
    unet = RecordingUNet()
    options = DiffusionOptions(steps=6, strength=1.0, guidance=2.0, seed=0)

    def progress(step, total):
        if step == 2:
            raise Stop()

    with pytest.raises(Stop):
        img2img(smooth_image(64, 64), np.zeros((2, C.SD_TOKEN_LENGTH, 8), np.float32), options,
                progress=progress, step_latents=lambda i, n, z: latents_seen.append((i, n, z.shape)),
                **fake_models(unet))
    assert len(unet.calls) == 2, "the loop went on after a cancelled step"
    assert latents_seen == [(1, 6, (1, 4, 8, 8)), (2, 6, (1, 4, 8, 8))]


def test_precheck_refuses_what_the_full_validation_refuses_in_the_same_words(astronaut_png):
    good = {"image": np.array([astronaut_png], dtype=object),
            "points": np.array([[200.0, 300.0]], np.float32), "labels": np.array([1], np.int32)}
    assert precheck_swap(**good).steps == validate_swap(**good).options.steps
    for change in ({"steps": np.array([0], np.int32)}, {"points": np.array([[900.0, 10.0]], np.float32)},
                   {"labels": np.array([0], np.int32)}, {"image": np.array([b"not an image"], dtype=object)},
                   {"upscale": np.array([3], np.int32)}):
        bad = {**good, **change}
        with pytest.raises(ValueError) as full:
            validate_swap(**bad)
        with pytest.raises(ValueError) as early:
            precheck_swap(**bad)
        same = re.compile(r"0x[0-9a-f]+")  # Pillow names the buffer by its address
        assert same.sub("0x", str(early.value)) == same.sub("0x", str(full.value))
