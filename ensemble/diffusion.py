"""Stable Diffusion img2img as numbered steps, with the models passed in as callables.

The loop is diffusers' ``StableDiffusionImg2ImgPipeline.__call__`` restated for serving: the text embeddings
are precomputed (see :mod:`isekai.ensemble.characters`), the VAE and UNet are plain functions from numpy
arrays to numpy arrays (BLS calls to the exported graphs in Triton, the PyTorch modules or numpy fakes in
tests), and the scheduler is a fresh diffusers scheduler per call, because schedulers keep per-run state
(step index, previous model outputs) that concurrent requests must not share.

The model callables, all float32 and NCHW:

- ``vae_encode(sample [B,3,H,W] in -1..1) -> latent_mean [B,4,H/8,W/8]`` (unscaled mean of the latent
  distribution);
- ``unet(sample [B,4,h,w], timestep [B] float32, encoder_hidden_states [B,77,D]) -> noise [B,4,h,w]``: B is 2
  (negative, prompt: classifier-free guidance) when guidance > 1, else 1 (the prompt alone, as diffusers
  does);
- ``vae_decode(latent_sample [B,4,h,w], divided by the scaling factor) -> sample [B,3,8h,8w] in ~-1..1``.

The scheduler is diffusers' own class, named by the exported pipeline (``pipeline.json``: DPM-Solver++
multistep, or ``LCMScheduler`` for an LCM-LoRA export); a request's ``steps`` and ``guidance`` default to that
scheduler's (:data:`isekai.constants.SCHEDULER_DEFAULTS`).

torch is used only for the scheduler arithmetic and the seeded noise (diffusers' schedulers work on tensors).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler

from isekai import constants as C

VaeEncode = Callable[[np.ndarray], np.ndarray]
UNet = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
VaeDecode = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]
StepLatents = Callable[[int, int, np.ndarray], None]

# The schedulers an exported pipeline may name (pipeline.json "scheduler"): diffusers' classes, never restated
# here.
SCHEDULERS: dict[str, type] = {C.DPM_SCHEDULER: DPMSolverMultistepScheduler, C.LCM_SCHEDULER: LCMScheduler}


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class ``name`` (one of :data:`SCHEDULERS`); else ValueError naming those."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler should be one of {sorted(SCHEDULERS)} but is {name!r}")
    return SCHEDULERS[name]


@dataclass(frozen=True)
class DiffusionOptions:
    """A request's sampling options; defaults and limits come from :mod:`isekai.constants`.

    ``strength`` is how much of the noise schedule is re-run over the input (1.0 ignores the input's content):
    ``int(steps * strength)`` denoising steps run, as in diffusers' img2img. ``steps`` and ``guidance`` left
    at None take the scheduler's defaults (:meth:`resolved`; img2img resolves them with the scheduler it
    runs).
    """

    steps: int | None = None
    strength: float = C.DEFAULT_STRENGTH
    guidance: float | None = None
    seed: int = C.DEFAULT_SEED

    def resolved(self, scheduler: str) -> DiffusionOptions:
        """These options with unset ``steps``/``guidance`` taken from ``scheduler``'s defaults (a class name;
        schedulers without their own defaults get DPM-Solver++'s)."""
        steps, guidance = C.SCHEDULER_DEFAULTS.get(scheduler, C.SCHEDULER_DEFAULTS[C.DEFAULT_SCHEDULER])
        return replace(self, steps=steps if self.steps is None else self.steps,
                       guidance=guidance if self.guidance is None else self.guidance)

    def check(self) -> None:
        """Raise ValueError naming the first option that is out of range, its value and the allowed range.

        Unset ``steps``/``guidance`` (None) pass: they become the scheduler's defaults, which are in range."""
        if self.steps is not None and (not isinstance(self.steps, numbers.Integral)
                                       or not 1 <= self.steps <= C.MAX_STEPS):
            raise ValueError(f"steps should be an integer in [1, {C.MAX_STEPS}] but is {self.steps}")
        if not isinstance(self.strength, numbers.Real) or not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength should be in (0.0, 1.0] but is {self.strength}")
        lo, hi = C.MIN_GUIDANCE, C.MAX_GUIDANCE
        if self.guidance is not None and (not isinstance(self.guidance, numbers.Real)
                                          or not lo <= self.guidance <= hi):
            raise ValueError(f"guidance should be in [{lo}, {hi}] but is {self.guidance}")
        if not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed <= C.MAX_SEED:
            raise ValueError(f"seed should be an integer in [0, {C.MAX_SEED}] but is {self.seed}")
        if self.steps is not None and self.denoising_steps() < 1:
            raise ValueError(
                f"steps * strength should be at least 1 but is {self.steps} * {self.strength}: "
                f"no denoising step would run"
            )

    def denoising_steps(self) -> int:
        """How many steps of a ``steps``-step schedule run: its last ``int(steps * strength)``.

        That is the number of UNet calls for first-order schedulers (DPM-Solver++, LCM, DDIM, Euler); PNDM
        adds one warm-up call and second-order ones (Heun) call twice per step. Needs ``steps`` set (see
        :meth:`resolved`)."""
        if self.steps is None:
            raise ValueError("steps is unset: resolve the options with the scheduler's defaults first")
        return min(int(self.steps * self.strength), int(self.steps))


def sd_input_size(h: int, w: int) -> tuple[int, int]:
    """The (H, W) in pixels a (h, w) crop is resized to for diffusion.

    The long side becomes ``SD_NATIVE_SIZE`` (SD 1.x's training size; smaller crops are scaled up), the short
    side keeps the aspect ratio rounded to a multiple of ``SD_SIZE_MULTIPLE`` (at least one multiple), which
    the VAE (factor 8) and the exported UNet (three 2x downsamplings of the latent) need.
    """
    if h < 1 or w < 1:
        raise ValueError(f"crop size should be positive but is (h={h}, w={w})")
    m = C.SD_SIZE_MULTIPLE
    scale = C.SD_NATIVE_SIZE / max(h, w)

    def side(n: int) -> int:
        return max(m, int(round(n * scale / m)) * m)

    return side(h), side(w)


def check_inputs(image: np.ndarray, embeddings: np.ndarray, options: DiffusionOptions) -> None:
    """Validate img2img's inputs before any model work; ValueError names the input and what is allowed."""
    options.check()
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image should be uint8 [H, W, 3] but is {dtype} {shape}")
    h, w = image.shape[:2]
    m = C.SD_SIZE_MULTIPLE
    if h < m or w < m or h % m or w % m:
        raise ValueError(f"image size should be multiples of {m} pixels (see sd_input_size) but is {h}x{w}")
    want = (2, C.SD_TOKEN_LENGTH)
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 3 or embeddings.shape[:2] != want:
        raise ValueError(
            f"embeddings should be float32 [2, {C.SD_TOKEN_LENGTH}, D] (negative, prompt) but are "
            f"{getattr(embeddings, 'shape', type(embeddings))}"
        )


def _checked(name: str, array: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A model callable's result as a float32 tensor, or ValueError naming the model and the shape it gave."""
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"{name} returned shape {list(array.shape)}, expected {list(shape)}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _retrieve_timesteps(scheduler: Any, options: DiffusionOptions) -> torch.Tensor:
    """Step 2: the schedule's tail that ``strength`` keeps (diffusers img2img's get_timesteps)."""
    scheduler.set_timesteps(int(options.steps))
    t_start = int(options.steps) - options.denoising_steps()
    begin = t_start * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def _prepare_latents(
    image: np.ndarray, scheduler: Any, timesteps: torch.Tensor, generator: torch.Generator,
    vae_encode: VaeEncode, scaling_factor: float,
) -> torch.Tensor:
    """Step 3: the image's latent mean, scaled, with noise from ``generator`` added at the first kept step."""
    h, w = image.shape[:2]
    # diffusers' VaeImageProcessor: /255 to 0..1, then 2x-1 to -1..1.
    sample = (image.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)[None]
    latent_shape = (1, C.SD_LATENT_CHANNELS, h // C.SD_VAE_FACTOR, w // C.SD_VAE_FACTOR)
    init = _checked("vae_encoder", vae_encode(np.ascontiguousarray(sample)), latent_shape) * scaling_factor
    noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
    return scheduler.add_noise(init, noise, timesteps[:1])


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """The seeded generator for schedulers whose step draws noise (LCM between steps), as diffusers' pipelines
    pass it (``prepare_extra_step_kwargs``): one generator for the initial noise and every step's."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _denoise(
    latents: torch.Tensor, scheduler: Any, timesteps: torch.Tensor, embeddings: np.ndarray, guidance: float,
    unet: UNet, progress: Progress | None, generator: torch.Generator,
    step_latents: StepLatents | None = None,
) -> torch.Tensor:
    """Step 4: one UNet call per step, then a scheduler step. Guidance above 1: one batch-2 call on [negative,
    prompt] (classifier-free guidance); guidance 1: one batch-1 call on the prompt (the guided prediction is
    the prompt's alone, so the negative's half would be computed and thrown away)."""
    guided = guidance > 1.0
    hidden = np.ascontiguousarray(embeddings if guided else embeddings[1:], dtype=np.float32)
    rows = hidden.shape[0]
    batch_shape = (rows, *latents.shape[1:])
    step_kwargs = _step_kwargs(scheduler, generator)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * rows), t)
        timestep = np.full((rows,), float(t), dtype=C.UNET_TIMESTEP_DTYPE)
        noise = _checked("unet", unet(model_input.numpy(), timestep, hidden), batch_shape)
        if guided:
            uncond, cond = noise.chunk(2)
            noise_pred = uncond + guidance * (cond - uncond)
        else:
            noise_pred = noise
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        if step_latents is not None:
            step_latents(i + 1, len(timesteps), latents.numpy())
        if progress is not None:
            progress(i + 1, len(timesteps))
    return latents


def _decode(latents: torch.Tensor, vae_decode: VaeDecode, scaling_factor: float) -> np.ndarray:
    """Step 5: latents -> uint8 [H, W, 3], rounded as diffusers' image processor does."""
    _, _, h, w = latents.shape
    shape = (1, 3, h * C.SD_VAE_FACTOR, w * C.SD_VAE_FACTOR)
    sample = _checked("vae_decoder", vae_decode((latents / scaling_factor).numpy()), shape)[0].numpy()
    image = np.clip(sample / 2.0 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
    return (image * 255.0).round().astype(np.uint8)


def img2img(
    image: np.ndarray,
    embeddings: np.ndarray,
    options: DiffusionOptions,
    *,
    vae_encode: VaeEncode,
    unet: UNet,
    vae_decode: VaeDecode,
    scheduler_config: Mapping[str, Any],
    scaling_factor: float,
    scheduler_cls: type = DPMSolverMultistepScheduler,
    progress: Progress | None = None,
    step_latents: StepLatents | None = None,
) -> np.ndarray:
    """Redraw ``image`` guided by ``embeddings``; the same inputs and seed give the same output.

    Args:
        image: uint8 [H, W, 3] RGB, H and W multiples of ``SD_SIZE_MULTIPLE`` (see :func:`sd_input_size`).
        embeddings: float32 [2, 77, D], row 0 negative (unconditional), row 1 the prompt (row 0 is not used
            at guidance 1).
        options: steps, strength, guidance, seed (checked first; unset steps/guidance take the scheduler's
            defaults, :data:`isekai.constants.SCHEDULER_DEFAULTS`).
        vae_encode, unet, vae_decode: the models as callables (module docstring).
        scheduler_config: a diffusers scheduler config (the model folder's scheduler_config.json).
        scaling_factor: the VAE's latent scaling factor (``vae.config.scaling_factor``).
        scheduler_cls: the diffusers scheduler class, built fresh from ``scheduler_config`` for this call
            (default DPM-Solver++ multistep; LCM, PNDM, Euler, ... work the same way; the exported pipeline
            names its own: :func:`scheduler_class` of ``PipelineConfig.scheduler``).
        progress: called as ``progress(step, total)`` after each denoising step; an exception it raises ends
            the loop there (how a cancelled request stops its UNet calls).
        step_latents: called as ``step_latents(step, total, latents)`` after each denoising step, before
            ``progress``, with the current latents float32 [1, 4, H/8, W/8] (scaled, still noisy; read-only
            use).

    Returns:
        uint8 [H, W, 3] RGB.
    """
    # 1. Check inputs (unset steps and guidance become this scheduler's defaults).
    options = options.resolved(scheduler_cls.__name__)
    check_inputs(image, embeddings, options)
    with torch.no_grad():
        # 2. A fresh scheduler and the timesteps that strength keeps.
        scheduler = scheduler_cls.from_config(dict(scheduler_config))
        timesteps = _retrieve_timesteps(scheduler, options)
        # 3. Initial latents: the image's latents with seeded noise at the first kept timestep.
        generator = torch.Generator().manual_seed(int(options.seed))
        latents = _prepare_latents(image, scheduler, timesteps, generator, vae_encode, scaling_factor)
        # 4. Denoising loop.
        latents = _denoise(latents, scheduler, timesteps, embeddings, float(options.guidance), unet, progress,
                           generator, step_latents)
        # 5. Decode to pixels.
        return _decode(latents, vae_decode, scaling_factor)
