"""Stable Diffusion img2img as numbered steps, with the models passed in as callables.

The loop is diffusers' ``StableDiffusionImg2ImgPipeline.__call__`` restated for serving: the text embeddings
are precomputed (see :mod:`isekai.ensemble.characters`), the VAE and UNet are plain functions from numpy
arrays to numpy arrays (BLS calls to the exported graphs in Triton, the PyTorch modules or numpy fakes in
tests), and the scheduler is a fresh diffusers scheduler per call, because schedulers keep per-run state
(step index, previous model outputs) that concurrent requests must not share.

The model callables, all float32 and NCHW:

- ``vae_encode(sample [B,3,H,W] in -1..1) -> latent_mean [B,4,H/8,W/8]`` (unscaled mean of the latent
  distribution);
- ``unet(sample [2,4,h,w], timestep [2] float32, encoder_hidden_states [2,77,D]) -> noise [2,4,h,w]``;
- ``vae_decode(latent_sample [B,4,h,w], divided by the scaling factor) -> sample [B,3,8h,8w] in ~-1..1``.

torch is used only for the scheduler arithmetic and the seeded noise (diffusers' schedulers work on tensors).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

from isekai import constants as C

VaeEncode = Callable[[np.ndarray], np.ndarray]
UNet = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
VaeDecode = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DiffusionOptions:
    """A request's sampling options; defaults and limits come from :mod:`isekai.constants`.

    ``strength`` is how much of the noise schedule is re-run over the input (1.0 ignores the input's content):
    ``int(steps * strength)`` denoising steps run, as in diffusers' img2img.
    """

    steps: int = C.DEFAULT_STEPS
    strength: float = C.DEFAULT_STRENGTH
    guidance: float = C.DEFAULT_GUIDANCE
    seed: int = C.DEFAULT_SEED

    def check(self) -> None:
        """Raise ValueError naming the first option that is out of range, its value and the allowed range."""
        if not isinstance(self.steps, numbers.Integral) or not 1 <= self.steps <= C.MAX_STEPS:
            raise ValueError(f"steps should be an integer in [1, {C.MAX_STEPS}] but is {self.steps}")
        if not isinstance(self.strength, numbers.Real) or not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength should be in (0.0, 1.0] but is {self.strength}")
        lo, hi = C.MIN_GUIDANCE, C.MAX_GUIDANCE
        if not isinstance(self.guidance, numbers.Real) or not lo <= self.guidance <= hi:
            raise ValueError(f"guidance should be in [{lo}, {hi}] but is {self.guidance}")
        if not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed <= C.MAX_SEED:
            raise ValueError(f"seed should be an integer in [0, {C.MAX_SEED}] but is {self.seed}")
        if self.denoising_steps() < 1:
            raise ValueError(
                f"steps * strength should be at least 1 but is {self.steps} * {self.strength}: "
                f"no denoising step would run"
            )

    def denoising_steps(self) -> int:
        """How many steps of a ``steps``-step schedule run: its last ``int(steps * strength)``.

        That is the number of UNet calls for first-order schedulers (DPM-Solver++, DDIM, Euler); PNDM adds one
        warm-up call and second-order ones (Heun) call twice per step."""
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
    image: np.ndarray, scheduler: Any, timesteps: torch.Tensor, seed: int, vae_encode: VaeEncode,
    scaling_factor: float,
) -> torch.Tensor:
    """Step 3: the image's latent mean, scaled, with seeded noise added at the first kept timestep."""
    h, w = image.shape[:2]
    # diffusers' VaeImageProcessor: /255 to 0..1, then 2x-1 to -1..1.
    sample = (image.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)[None]
    latent_shape = (1, C.SD_LATENT_CHANNELS, h // C.SD_VAE_FACTOR, w // C.SD_VAE_FACTOR)
    init = _checked("vae_encoder", vae_encode(np.ascontiguousarray(sample)), latent_shape) * scaling_factor
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
    return scheduler.add_noise(init, noise, timesteps[:1])


def _denoise(
    latents: torch.Tensor, scheduler: Any, timesteps: torch.Tensor, embeddings: np.ndarray, guidance: float,
    unet: UNet, progress: Progress | None,
) -> torch.Tensor:
    """Step 4: one UNet call per step on [negative, prompt] (classifier-free guidance), then a scheduler
    step."""
    hidden = np.ascontiguousarray(embeddings, dtype=np.float32)
    pair_shape = (2, *latents.shape[1:])
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        timestep = np.full((2,), float(t), dtype=C.UNET_TIMESTEP_DTYPE)
        noise = _checked("unet", unet(model_input.numpy(), timestep, hidden), pair_shape)
        uncond, cond = noise.chunk(2)
        noise_pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
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
) -> np.ndarray:
    """Redraw ``image`` guided by ``embeddings``; the same inputs and seed give the same output.

    Args:
        image: uint8 [H, W, 3] RGB, H and W multiples of ``SD_SIZE_MULTIPLE`` (see :func:`sd_input_size`).
        embeddings: float32 [2, 77, D], row 0 negative (unconditional), row 1 the prompt.
        options: steps, strength, guidance, seed (checked first).
        vae_encode, unet, vae_decode: the models as callables (module docstring).
        scheduler_config: a diffusers scheduler config (the model folder's scheduler_config.json).
        scaling_factor: the VAE's latent scaling factor (``vae.config.scaling_factor``).
        scheduler_cls: the diffusers scheduler class, built fresh from ``scheduler_config`` for this call
            (default DPM-Solver++ multistep; PNDM, Euler, ... work the same way).
        progress: called as ``progress(step, total)`` after each denoising step.

    Returns:
        uint8 [H, W, 3] RGB.
    """
    # 1. Check inputs.
    check_inputs(image, embeddings, options)
    with torch.no_grad():
        # 2. A fresh scheduler and the timesteps that strength keeps.
        scheduler = scheduler_cls.from_config(dict(scheduler_config))
        timesteps = _retrieve_timesteps(scheduler, options)
        # 3. Initial latents: the image's latents with seeded noise at the first kept timestep.
        latents = _prepare_latents(image, scheduler, timesteps, options.seed, vae_encode, scaling_factor)
        # 4. Denoising loop.
        latents = _denoise(latents, scheduler, timesteps, embeddings, float(options.guidance), unet, progress)
        # 5. Decode to pixels.
        return _decode(latents, vae_decode, scaling_factor)
