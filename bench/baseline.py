"""Configuration 1, in-process PyTorch, in two modes (:data:`MODES`), one after the other in one process:

**1a seed-style** (``seed``), as the original app (and Inpaint-Anything) ran the pipeline:

- SAM: segment-anything's ``SamPredictor``, ``set_image`` on every request (no embedding cache), ``predict``
  with the click (multimask, best score), and again on the generated crop with the person's box (compose);
- LaMa: the big-lama generator in torch (``torch.fft``), on the whole scene padded to a multiple of 8;
- Stable Diffusion: diffusers' ``StableDiffusionImg2ImgPipeline`` built from the local folder (never the hub),
  with the same scheduler (DPM-Solver++ multistep), steps, strength, guidance and seed as the served pipeline,
  on the same person crop; it encodes the prompts on every call, as the pipeline does.

**1b same work** (``same_work``): the served pipeline's work, run by PyTorch: LaMa on the same crop around the
hole, the character's precomputed prompt embeddings (no text encoder call), and compose's default silhouette
(the person's own mask: no second SAM encode). The stages run one after the other, as a plain program does;
the served pipeline's parallel branches are part of what serving brings.

Masks, crops and compositing use the project's own ``ensemble/`` functions in both modes.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from bench.models import ROOT, Checkpoints
from bench.timing import StageTimer, say
from isekai import constants as C
from isekai.ensemble.compose import compose_scene, prepare_person, public_mask
from isekai.ensemble.crops import CropGeometry, lama_inputs
from isekai.ensemble.diffusion import DiffusionOptions
from isekai.ensemble.images import decode_image, encode_image

MODES = ("seed", "same_work")

# segment-anything's SamPredictor imports torchvision for two resize helpers; the test suite's reference
# module lends it a faithful stand-in when torchvision is absent (it is not a dependency of isekai).
REFERENCE_SAM = ROOT / "tests" / "reference_sam.py"


def sam_predictor_class() -> type:
    spec = importlib.util.spec_from_file_location("isekai_bench_reference_sam", REFERENCE_SAM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SamPredictor


class TorchBaseline:
    """The three PyTorch models, loaded once; :meth:`swap` is one request of the original app."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        import torch  # noqa: PLC0415
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline  # noqa: PLC0415

        from isekai.export.lama import LamaInpainter, load_lama_checkpoint  # noqa: PLC0415
        from isekai.export.sam import load_sam  # noqa: PLC0415

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.predictor = sam_predictor_class()(load_sam(checkpoints.sam))
        self.lama = LamaInpainter(load_lama_checkpoint(checkpoints.lama_checkpoint, checkpoints.lama_config)
                                  .set_dft("fft")).eval()
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            str(checkpoints.sd), local_files_only=True, torch_dtype=torch.float32, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.timer = StageTimer()
        self._hook_stages()

    def _hook_stages(self) -> None:
        """Time the pipeline's models from inside ``__call__``: UNet and text encoder calls, VAE
        encode/decode."""
        pipe, starts = self.pipe, {}

        def hooks(module, stage: str) -> None:
            module.register_forward_pre_hook(lambda *_: starts.__setitem__(stage, time.perf_counter()))
            module.register_forward_hook(
                lambda *_: self.timer.calls[stage].append(time.perf_counter() - starts[stage]))

        hooks(pipe.unet, "unet_step")
        hooks(pipe.text_encoder, "text_encoder")
        pipe.vae.encode = self.timer.wrap("vae_encoder", pipe.vae.encode)
        pipe.vae.decode = self.timer.wrap("vae_decoder", pipe.vae.decode)

    def img2img(self, crop: np.ndarray, prompts: tuple, options: DiffusionOptions, progress=None
                ) -> np.ndarray:
        """``prompts``: (prompt, negative prompt) as text (the pipeline encodes them) or as embeddings float32
        [1, 77, D] each (precomputed, as the served pipeline's characters are)."""
        from PIL import Image  # noqa: PLC0415

        def on_step(pipe, step, timestep, kwargs):
            if progress is not None:
                progress(step + 1, pipe._num_timesteps if hasattr(pipe, "_num_timesteps") else 0)
            return kwargs

        prompt, negative = prompts
        if isinstance(prompt, str):
            text = {"prompt": prompt, "negative_prompt": negative}
        else:
            text = {"prompt_embeds": self.torch.from_numpy(prompt),
                    "negative_prompt_embeds": self.torch.from_numpy(negative)}
        out = self.pipe(
            **text, image=Image.fromarray(crop),
            strength=options.strength, num_inference_steps=options.steps, guidance_scale=options.guidance,
            generator=self.torch.Generator().manual_seed(options.seed), output_type="np",
            callback_on_step_end=on_step,
        ).images[0]
        return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def _segment(self, rgb: np.ndarray, points=None, labels=None, box=None) -> np.ndarray:
        """SamPredictor as the original app used it: set_image, then the best of the multimask logits."""
        timer = self.timer
        with timer("sam_encoder"):
            self.predictor.set_image(rgb)
        with timer("sam_decoder"):
            masks, scores, _ = self.predictor.predict(point_coords=points, point_labels=labels, box=box,
                                                      multimask_output=True, return_logits=True)
        return masks[int(np.argmax(scores))][None, None]

    def swap(self, image: bytes, click: tuple[float, float], prompts: tuple, options: DiffusionOptions,
             progress=None, mode: str = "seed") -> bytes:
        """One swap in ``mode`` (:data:`MODES`); ``prompts`` as :meth:`img2img` takes them."""
        if mode not in MODES:
            raise ValueError(f"mode should be one of {MODES} but is {mode!r}")
        timer = self.timer
        with self.torch.no_grad():
            with timer("decode"):
                rgb = decode_image(image)
            points, labels = np.array([click], np.float32), np.array([1], np.int32)
            logits = self._segment(rgb, points, labels)
            with timer("prepare"):
                prepared = prepare_person(rgb, logits, points, labels)
                public_mask(logits)
                if mode == "seed":  # LaMa on the whole scene
                    h, w = rgb.shape[:2]
                    lama_geometry = CropGeometry.plan((0, 0, w, h), long_side=max(h, w),
                                                      multiple=C.LAMA_MODULO, upscale=False,
                                                      min_side=C.LAMA_MIN_SIDE)
                    lama_image, lama_mask = lama_inputs(rgb, prepared.hole, lama_geometry)
                else:  # the served pipeline's crop around the hole
                    lama_geometry = prepared.lama_geometry
                    lama_image, lama_mask = prepared.lama_image, prepared.lama_mask
            with timer("lama"):
                inpainted = self.lama(
                    self.torch.from_numpy(lama_image), self.torch.from_numpy(lama_mask)
                ).numpy()
            if not prepared.found:  # a click on nothing: the photo comes back, as the served pipeline does
                return encode_image(rgb, "png")
            with timer("diffusion"):
                character = self.img2img(prepared.person_image, prompts, options, progress)
            silhouette = None  # the same work as served: compose's default silhouette
            if mode == "seed" or C.DEFAULT_SILHOUETTE == "sam":
                silhouette = self._segment(character, box=prepared.character_box)
            with timer("compose"):
                result, background = compose_scene(rgb, prepared.mask, prepared.hole, inpainted,
                                                   lama_geometry, character, silhouette,
                                                   prepared.person_geometry)
                encoded = encode_image(result, "png")
                encode_image(background, "png")
        return encoded


def load(checkpoints: Checkpoints) -> TorchBaseline:
    say(f"baseline: loading PyTorch models (SAM {Path(checkpoints.sam).name}, big-lama, SD folder "
        f"{Path(checkpoints.sd).name})")
    return TorchBaseline(checkpoints)


def run(models, scenes, options: DiffusionOptions, runs: int, warmup: DiffusionOptions, nonce: str,
        mode: str = "seed") -> dict:
    """Configuration 1 in ``mode`` (1a ``seed``, 1b ``same_work``) on every scene: ``runs`` swaps each after
    one warm-up swap."""
    import resource  # noqa: PLC0415

    from bench.inprocess import step_progress  # noqa: PLC0415
    from bench.timing import median  # noqa: PLC0415
    from isekai.ensemble.characters import CharacterStore  # noqa: PLC0415

    started = time.perf_counter()
    baseline = load(models.checkpoints)
    result: dict = {"load_s": time.perf_counter() - started, "scenes": {}}
    character = CharacterStore(models.repository).get(None)
    if mode == "seed":  # the pipeline encodes the prompts on every call
        prompts = (character.prompt, character.negative_prompt)
    else:  # the character's precomputed embeddings, as served
        prompts = (character.embeddings[1:], character.embeddings[:1])
    say(f"baseline ({mode}): loaded in {result['load_s']:.0f} s; warm-up swap")
    baseline.swap(scenes[0].png(f"{nonce}-warmup"), scenes[0].click, prompts, warmup, mode=mode)
    for scene in scenes:
        e2e = []
        baseline.timer.calls.clear()  # the hooks hold this timer: clear it, never replace it
        for i in range(runs):
            label = f"baseline ({mode}) {scene.name} swap {i + 1}/{runs}"
            t0 = time.perf_counter()
            baseline.swap(scene.png(f"{nonce}-{i}"), scene.click, prompts, options, step_progress(label),
                          mode=mode)
            e2e.append(time.perf_counter() - t0)
            say(f"{label} took {e2e[-1]:.1f} s")
        result["scenes"][scene.name] = {"e2e_s": e2e, "e2e_p50_s": median(e2e),
                                        "stages_ms": baseline.timer.per_call_ms(),
                                        "encoder_runs": len(baseline.timer.calls["sam_encoder"]) // runs}
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result
