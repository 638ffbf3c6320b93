"""DreamBooth-LoRA: teach a Stable Diffusion 1.x folder a character from 8-10 photos, as a LoRA file.

:func:`train_dreambooth_lora` (the ``isekai character train`` command line calls it) runs these steps:

1. check the inputs (options, prompt, every photo decoded) before any model is loaded;
2. load the base folder from disk (:func:`isekai.export.sd.load_sd`, never a hub name) and a DDPM noise
   scheduler from its ``scheduler/`` config;
3. with prior preservation, top up the class-image folder with images the base model draws from the class
   prompt (:func:`isekai.export.train_photos.prepare_class_images`);
4. add LoRA factors (peft) to the UNet's attention projections ``to_q/to_k/to_v/to_out.0``, and to the text
   encoder's ``q_proj/k_proj/v_proj/out_proj`` with ``train_text_encoder``; everything else stays frozen;
5. the loop (:class:`LoraTrainer`): photos -> VAE latents -> noise at random timesteps -> the UNet predicts
   the noise (or v, as the scheduler config says) -> MSE (+ ``prior_loss_weight`` x the class images' MSE)
   -> AdamW on the LoRA factors; a checkpoint every ``checkpoint_every`` steps and at the end;
6. write ``pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights`` does (keys
   ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``, and
   ``text_encoder.<module>.lora_linear_layer.down.weight`` / ``.up.weight``), so
   ``StableDiffusionPipeline.load_lora_weights`` and the LoRA export read it.

The photos and class images, how they are decoded, sized and cropped: :mod:`isekai.export.train_photos`.

Randomness and resuming: step k draws everything it uses (which photos, crops and flips, noise, timesteps,
the VAE posterior sample) from a generator seeded by ``(seed, k)``, and each epoch's photo order from one
seeded by ``(seed, epoch)`` (:func:`~isekai.export.train_photos.seeded_generator`). No generator state has
to survive between steps, so a run resumed from ``checkpoint-k`` repeats exactly what an uninterrupted run
does after step k. A checkpoint holds the LoRA factors, AdamW's state, the step, and torch's global RNG
state (what dropout would draw from, if a base config enabled it); everything is loaded back with
``torch.load(weights_only=True)`` or safetensors::

    OUTPUT/checkpoint-<step>/lora.safetensors   LoRA factors, peft names ("unet.<module>.lora_A.weight")
    OUTPUT/checkpoint-<step>/optimizer.pt       AdamW's state dict (tensors and numbers)
    OUTPUT/checkpoint-<step>/rng.pt             {"cpu": uint8 tensor[, "cuda": uint8 tensor]}
    OUTPUT/checkpoint-<step>/scaler.pt          the fp16 loss scaler's state (mixed precision only)
    OUTPUT/checkpoint-<step>/state.json         the step, and the options a resume must match
    OUTPUT/pytorch_lora_weights.safetensors     the result
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from isekai import constants as C
from isekai.export.common import progress
from isekai.export.sd import SdModels, check_sd_folder, load_sd
from isekai.export.train_photos import (
    CLASS_ORDER_STREAM,
    PHOTO_ORDER_STREAM,
    STEP_STREAM,
    crop,
    list_photos,
    load_photos,
    prepare_class_images,
    seeded_generator,
)

LORA_FILENAME = "pytorch_lora_weights.safetensors"  # the name diffusers' loaders look for
# diffusers' train_dreambooth_lora.py targets: the attention projections of the UNet and of CLIP's layers.
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N"
MIXED_PRECISIONS = ("no", "fp16")
DEFAULT_OUTPUT = Path("dreambooth-lora")
# AdamW as diffusers' DreamBooth scripts set it (their --adam_* defaults).
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPSILON = 1e-8

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class TrainOptions:
    """How to train. The defaults are diffusers' DreamBooth-LoRA ones for 8-10 photos of one subject."""

    steps: int = 400  # optimizer steps in all (a resume counts the ones already done)
    rank: int = 4  # LoRA rank r; alpha = r, so the LoRA scale alpha / r is 1
    learning_rate: float = 1e-4  # AdamW, constant
    resolution: int = 512  # square training side in pixels, a multiple of C.SD_SIZE_MULTIPLE
    batch_size: int = 1  # photos per step (as many class images again with prior preservation)
    max_grad_norm: float = 1.0  # gradient clipping of the LoRA factors' global norm
    augment: bool = True  # random crop + horizontal flip per step; False: centre crop, no flip
    prior_preservation: bool = False  # DreamBooth's class-prior loss (needs class_prompt)
    class_prompt: str | None = None  # e.g. "a photo of a girl": what the base model should still draw
    class_images: Path | None = None  # folder of class images; default OUTPUT/class-images
    num_class_images: int = 50  # class images used; missing ones are generated with the base model
    class_inference_steps: int = 25  # denoising steps per generated class image
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False  # also LoRA on the text encoder's attention projections
    checkpoint_every: int = 100  # steps between checkpoints (one is also written at the last step)
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when torch sees one), "cpu", "cuda", "cuda:N"
    mixed_precision: str = "no"  # "fp16": autocast the forward passes on CUDA (weights stay float32)

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "rank": self.rank,
            "batch_size": self.batch_size,
            "num_class_images": self.num_class_images,
            "class_inference_steps": self.class_inference_steps,
            "checkpoint_every": self.checkpoint_every,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} should be an integer >= 1 but is {value!r}")
        for name, value in (("learning_rate", self.learning_rate), ("max_grad_norm", self.max_grad_norm)):
            if not value > 0:
                raise ValueError(f"{name} should be > 0 but is {value!r}")
        if not self.prior_loss_weight >= 0:
            raise ValueError(f"prior_loss_weight should be >= 0 but is {self.prior_loss_weight!r}")
        if self.resolution < C.SD_SIZE_MULTIPLE or self.resolution % C.SD_SIZE_MULTIPLE:
            raise ValueError(
                f"resolution should be a positive multiple of {C.SD_SIZE_MULTIPLE} but is {self.resolution}"
            )
        if not 0 <= self.seed <= C.MAX_SEED:
            raise ValueError(f"seed should be in [0, {C.MAX_SEED}] but is {self.seed}")
        if self.prior_preservation and not (self.class_prompt or "").strip():
            raise ValueError(
                "prior preservation needs a class prompt (e.g. 'a photo of a girl'), but none is given"
            )
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"device should be one of {DEVICES} or 'cuda:N' but is {self.device!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"mixed_precision should be one of {MIXED_PRECISIONS} but is {self.mixed_precision!r}"
            )


# Options that may change between a run and its resume: they do not change what is computed.
_RESUMABLE_CHANGES = (
    "steps",
    "checkpoint_every",
    "device",
    "mixed_precision",
    "class_images",
    "class_inference_steps",
)


def resolve_device(options: TrainOptions) -> torch.device:
    """The torch device ``options.device`` names; ValueError if it is not there or fp16 is asked off CUDA."""
    name = options.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {options.device!r}: this torch sees no CUDA device (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif options.mixed_precision != "no":
        raise ValueError(f"mixed_precision {options.mixed_precision!r} needs a CUDA device, not {name!r}")
    return device


# --- the trainer --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """What one step consumes. N rows: the batch's photos, then (prior preservation) as many class images."""

    pixels: torch.Tensor  # float32 [N, 3, R, R] in -1..1, CPU
    noise: torch.Tensor  # float32 [N, 4, R/8, R/8], standard normal, CPU
    timesteps: torch.Tensor  # int64 [N] in [0, num_train_timesteps), CPU
    sample_seed: int  # seeds the VAE posterior sample of the latents


@dataclass(frozen=True)
class StepLoss:
    total: float  # instance + prior_loss_weight * prior
    instance: float  # MSE on the photos' rows
    prior: float | None  # MSE on the class images' rows (prior preservation only)


class LoraTrainer:
    """A base SD 1.x model with LoRA factors added, their AdamW optimizer, and one training step.

    ``photos`` and ``class_photos`` are uint8 [3, H, W] RGB tensors with min(H, W) >= ``options.resolution``
    (see :func:`~isekai.export.train_photos.load_photo`). The LoRA factors are drawn from seed
    ``options.seed`` (peft's "gaussian" init: A normal with std 1/r, B = 0, so training starts from the base
    model exactly); the caller's global RNG is left as it was.
    """

    def __init__(
        self,
        models: SdModels,
        prompt: str,
        options: TrainOptions,
        photos: Sequence[torch.Tensor],
        class_photos: Sequence[torch.Tensor] = (),
    ):
        if not photos:
            raise ValueError("training needs at least one photo")
        if options.prior_preservation and not class_photos:
            raise ValueError("prior preservation needs class images, but none were given")
        if models.unet is None or models.vae is None:
            raise ValueError(f"{models.folder} was loaded text-only: training needs its UNet and VAE")
        self.prompt, self.options = prompt, options
        self.photos = list(photos)
        self.class_photos = list(class_photos) if options.prior_preservation else []
        self.device = resolve_device(options)
        self.fp16 = options.mixed_precision == "fp16"
        self.noise_scheduler = _noise_scheduler(models.folder)
        self.prediction_type = self.noise_scheduler.config.prediction_type

        self.unet, self.vae, self.text_encoder = models.unet, models.vae, models.text_encoder
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            _add_lora(self.unet, UNET_TARGETS, options.rank)
            if options.train_text_encoder:
                _add_lora(self.text_encoder, TEXT_ENCODER_TARGETS, options.rank)
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device)
        self.unet.train()
        self.text_encoder.train(options.train_text_encoder)
        self.vae.eval()

        self.lora_parameters = [
            p for m in self.lora_modules().values() for p in m.parameters() if p.requires_grad
        ]
        self.optimizer = torch.optim.AdamW(
            self.lora_parameters,
            lr=options.learning_rate,
            betas=ADAM_BETAS,
            weight_decay=ADAM_WEIGHT_DECAY,
            eps=ADAM_EPSILON,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.fp16)
        prompts = [prompt] + ([options.class_prompt or ""] if options.prior_preservation else [])
        self.input_ids = models.tokenizer(
            prompts, padding="max_length", max_length=C.SD_TOKEN_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)  # int64 [1 or 2, 77]
        self._frozen_text: torch.Tensor | None = None

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The models holding LoRA factors, by their diffusers name ("unet", "text_encoder")."""
        return {
            "unet": self.unet,
            **({"text_encoder": self.text_encoder} if self.options.train_text_encoder else {}),
        }

    # --- one step -------------------------------------------------------------------------------------------

    def draw_batch(self, step: int) -> Batch:
        """The batch of step ``step`` (0-based): a function of (seed, step) alone."""
        options, rows = self.options, []
        generator = seeded_generator(options.seed, STEP_STREAM, step)
        window = generator if options.augment else None
        for stream, pool in ((PHOTO_ORDER_STREAM, self.photos), (CLASS_ORDER_STREAM, self.class_photos)):
            for i in range(options.batch_size if pool else 0):
                index = _shuffled(len(pool), options.seed, stream, step * options.batch_size + i)
                rows.append(crop(pool[index], options.resolution, window))
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent cell
        side = options.resolution // factor
        noise = torch.randn((len(rows), self.vae.config.latent_channels, side, side), generator=generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(rows),), generator=generator)
        sample_seed = int(torch.randint(2**62, (), generator=generator))
        return Batch(torch.stack(rows), noise, timesteps, sample_seed)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(total, instance MSE, class MSE or None) of ``batch``: float32 scalars, gradients to the LoRA."""
        device = self.device
        with torch.no_grad():  # the VAE is frozen: its latents are data
            posterior = self.vae.encode(batch.pixels.to(device)).latent_dist
            sample = posterior.sample(generator=torch.Generator().manual_seed(batch.sample_seed))
            latents = sample * self.vae.config.scaling_factor
        noise, timesteps = batch.noise.to(device), batch.timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.float16, enabled=self.fp16):
            hidden = self._text_embeddings()
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        per_row = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        instance = per_row[: self.options.batch_size].mean()
        if not self.class_photos:
            return instance, instance, None
        prior = per_row[self.options.batch_size :].mean()
        return instance + self.options.prior_loss_weight * prior, instance, prior

    def _text_embeddings(self) -> torch.Tensor:
        """[N, 77, D]: the prompt's last hidden state for the photo rows, then the class prompt's.

        Computed once when the text encoder is frozen; every step, with gradients, when it is trained.
        """
        if self.options.train_text_encoder:
            hidden = self.text_encoder(input_ids=self.input_ids, return_dict=False)[0]
        else:
            if self._frozen_text is None:
                with torch.no_grad():
                    self._frozen_text = self.text_encoder(input_ids=self.input_ids, return_dict=False)[0]
            hidden = self._frozen_text
        return hidden.repeat_interleave(self.options.batch_size, dim=0)

    def step(self, batch: Batch) -> StepLoss:
        """One AdamW step on ``batch``; RuntimeError if the loss is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        total, instance, prior = self.loss(batch)
        if not torch.isfinite(total):
            raise RuntimeError(f"the training loss is {total.item()}: lower the learning rate")
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(self.lora_parameters, self.options.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepLoss(total.item(), instance.item(), None if prior is None else prior.item())

    # --- saving ---------------------------------------------------------------------------------------------

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA factors on CPU by peft name and model: "unet.<module>.lora_A.weight" [r, in], ..."""
        from peft import get_peft_model_state_dict  # noqa: PLC0415

        return {
            f"{name}.{key}": value.detach().to("cpu", copy=True).contiguous()
            for name, module in self.lora_modules().items()
            for key, value in get_peft_model_state_dict(module).items()
        }

    def save_lora(self, output: Path) -> Path:
        """Write ``output/pytorch_lora_weights.safetensors`` with diffusers' own writer; return its path."""
        from diffusers import StableDiffusionPipeline  # noqa: PLC0415
        from diffusers.utils import convert_state_dict_to_diffusers  # noqa: PLC0415

        layers: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
        for key, value in self.lora_state().items():
            name, _, rest = key.partition(".")
            layers[name][rest] = value
        text = layers["text_encoder"]
        StableDiffusionPipeline.save_lora_weights(
            str(output),
            unet_lora_layers=convert_state_dict_to_diffusers(layers["unet"]),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(text) if text else None,
            weight_name=LORA_FILENAME,
        )
        return output / LORA_FILENAME

    def save_checkpoint(self, output: Path, step: int) -> Path:
        """Write ``output/checkpoint-<step>/`` (see the module docstring), atomically: no half checkpoints."""
        from safetensors.torch import save_file  # noqa: PLC0415

        final = output / f"checkpoint-{step}"
        partial = output / f".checkpoint-{step}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file(self.lora_state(), str(partial / "lora.safetensors"))
        torch.save(self.optimizer.state_dict(), partial / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, partial / "rng.pt")
        if self.fp16:
            torch.save(self.scaler.state_dict(), partial / "scaler.pt")
        state = {"step": step, "options": run_identity(self.prompt, self.options)}
        (partial / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return final

    def load_checkpoint(self, folder: Path) -> int:
        """Restore a checkpoint written by :meth:`save_checkpoint`; return its step.

        ValueError if it was written with other options (:func:`run_identity`) or its LoRA factors do not fit.
        """
        from peft import set_peft_model_state_dict  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        state = _read_state(folder, self.prompt, self.options)
        saved = load_file(str(folder / "lora.safetensors"))
        expected = self.lora_state()
        wrong = sorted(
            k
            for k in expected.keys() | saved.keys()
            if k not in saved or k not in expected or saved[k].shape != expected[k].shape
        )
        if wrong:
            raise ValueError(
                f"{folder}: its LoRA factors do not fit this model ({len(wrong)} differ, e.g. {wrong[0]})"
            )
        for name, module in self.lora_modules().items():
            prefix = f"{name}."
            part = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
            set_peft_model_state_dict(module, part)
        optimizer = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optimizer)
        rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.fp16 and (folder / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        return int(state["step"])


def _noise_scheduler(folder: Path) -> Any:
    """The DDPM scheduler of ``folder/scheduler``; ValueError unless it predicts epsilon or v.

    Its config only is used (betas, prediction type): training needs ``add_noise`` and ``get_velocity``.
    """
    from diffusers import DDPMScheduler  # noqa: PLC0415

    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"{folder}: prediction_type {prediction_type!r} is not epsilon or v_prediction")
    return scheduler


def _shuffled(count: int, seed: int, stream: int, position: int) -> int:
    """Index of the ``position``-th draw from ``count`` items: each item once per epoch, in a seeded order."""
    epoch, offset = divmod(position, count)
    return int(torch.randperm(count, generator=seeded_generator(seed, stream, epoch))[offset])


def _add_lora(module: torch.nn.Module, targets: Sequence[str], rank: int) -> None:
    """Inject rank-``rank`` LoRA factors (adapter "default", alpha = rank) into ``targets`` of ``module``."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
    inject_adapter_in_model(config, module)


# --- resuming -----------------------------------------------------------------------------------------------


def run_identity(prompt: str, options: TrainOptions) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (JSON-ready)."""
    identity = {k: v for k, v in dataclasses.asdict(options).items() if k not in _RESUMABLE_CHANGES}
    if not options.prior_preservation:  # then the class options are unused: changing them changes nothing
        for key in ("class_prompt", "num_class_images", "prior_loss_weight"):
            del identity[key]
    identity["prompt"] = prompt
    identity["unet_targets"] = list(UNET_TARGETS)
    identity["text_encoder_targets"] = list(TEXT_ENCODER_TARGETS) if options.train_text_encoder else []
    return identity


def _read_state(folder: Path, prompt: str, options: TrainOptions) -> dict[str, Any]:
    """Checkpoint ``folder``'s ``state.json``; ValueError if its :func:`run_identity` is not this run's."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    saved = state["options"]
    differ = [
        f"{key}={saved.get(key)!r} there, {value!r} here"
        for key, value in run_identity(prompt, options).items()
        if saved.get(key) != value
    ]
    if differ:
        raise ValueError(
            f"cannot resume from {folder}: it was trained with other options ({'; '.join(differ)}). "
            "Resume with the same options, or train into another output folder"
        )
    return state


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``output`` as (step, folder), oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted((step, p) for step, p in found if (p / "state.json").is_file())


def _starting_checkpoint(output: Path, resume: bool, prompt: str, options: TrainOptions) -> Path | None:
    """The checkpoint to resume from, None to start afresh.

    ValueError if ``output`` holds a run and ``resume`` is off, or if that run's options differ or it is
    already past ``options.steps``. Reads only ``state.json``: this runs before any model is loaded.
    """
    found = checkpoints(output)
    if not resume:
        if found or (output / LORA_FILENAME).exists():
            raise ValueError(
                f"{output} already holds a training run: resume it (--resume) or choose another output folder"
            )
        return None
    if not found:
        progress(f"{output} holds no checkpoint: starting from step 0")
        return None
    step, folder = found[-1]
    _read_state(folder, prompt, options)
    if step > options.steps:
        raise ValueError(f"cannot resume from {folder}: it is past steps={options.steps}; ask for >= {step}")
    return folder


# --- the whole run ------------------------------------------------------------------------------------------


def train_dreambooth_lora(
    base: str | Path,
    images: str | Path,
    prompt: str,
    output: str | Path,
    options: TrainOptions = TrainOptions(),
    resume: bool = False,
) -> Path:
    """Train a DreamBooth LoRA of the subject in ``images`` on the SD 1.x folder ``base`` (module docstring).

    ``prompt`` names the subject with a rare token, e.g. "a photo of sks girl". ``output`` receives the
    checkpoints and ``pytorch_lora_weights.safetensors``, whose path is returned. With ``resume``, training
    continues from the newest checkpoint in ``output`` (the same options are required) and ends with the
    weights an uninterrupted run would. Bad inputs raise ValueError (FileNotFoundError for a missing folder)
    before any model is loaded.
    """
    # 1. inputs: the folder, prompt, device, every photo, the run to resume; no model is loaded yet
    base, output = check_sd_folder(base), Path(output)
    if not prompt.strip() or len(prompt) > C.MAX_PROMPT_CHARS:
        raise ValueError(
            f"prompt should have 1 to {C.MAX_PROMPT_CHARS} characters but has {len(prompt.strip())}"
        )
    device = resolve_device(options)
    photos = load_photos(list_photos(images), options.resolution)
    checkpoint = _starting_checkpoint(output, resume, prompt, options)
    output.mkdir(parents=True, exist_ok=True)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(options.seed)  # the global RNG: only dropout would draw from it
        # 2. the base model, from disk
        models = load_sd(base)
        # 3. class images (prior preservation), drawn before LoRA is added: by the base model itself
        class_photos = _class_photos(models, output, options, device) if options.prior_preservation else []
        # 4. LoRA factors and their optimizer, restored from the checkpoint when resuming
        trainer = LoraTrainer(models, prompt, options, photos, class_photos)
        start = trainer.load_checkpoint(checkpoint) if checkpoint is not None else 0
        if start:
            progress(f"resuming from {checkpoint} (step {start} of {options.steps})")
        # 5. the loop
        _train_steps(trainer, start, output)
        # 6. the LoRA file
        path = trainer.save_lora(output)
    progress(f"LoRA (rank {options.rank}, {len(trainer.lora_parameters)} tensors) written to {path}")
    return path


def _class_photos(
    models: SdModels, output: Path, options: TrainOptions, device: torch.device
) -> list[torch.Tensor]:
    """The class images the options ask for, from ``options.class_images`` or ``output/class-images``."""
    folder = Path(options.class_images) if options.class_images is not None else output / "class-images"
    return prepare_class_images(
        models,
        options.class_prompt or "",
        folder,
        options.num_class_images,
        options.resolution,
        seed=options.seed,
        inference_steps=options.class_inference_steps,
        fp16=options.mixed_precision == "fp16",
        device=device,
    )


def _train_steps(trainer: LoraTrainer, start: int, output: Path) -> None:
    """Steps ``start`` .. ``steps - 1`` under a tqdm bar on stderr, checkpointing as the options say."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    options = trainer.options
    with tqdm(
        total=options.steps, initial=start, desc="dreambooth-lora", unit="step", file=sys.stderr
    ) as bar:
        for step in range(start, options.steps):
            loss = trainer.step(trainer.draw_batch(step))
            postfix = {"loss": f"{loss.total:.4f}"}
            if loss.prior is not None:
                postfix["prior"] = f"{loss.prior:.4f}"
            postfix["lr"] = f"{options.learning_rate:.1e}"  # constant: shown so a log says what was used
            bar.set_postfix(postfix, refresh=False)
            bar.update()
            done = step + 1
            if done % options.checkpoint_every == 0 or done == options.steps:
                trainer.save_checkpoint(output, done)


# --- command line -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags (defaults from :class:`TrainOptions`)."""
    d = TrainOptions()
    parser.add_argument(
        "--images", required=True, type=Path, help="folder of 8-10 photos of the character (png/jpg/webp)"
    )
    parser.add_argument(
        "--base",
        required=True,
        type=Path,
        help="diffusers Stable Diffusion 1.x folder to train on (read from disk only)",
    )
    parser.add_argument(
        "--prompt",
        required=True,
        help='the character\'s prompt with a rare token, e.g. "a photo of sks girl"',
    )
    parser.add_argument(
        "--steps", type=int, default=d.steps, help=f"training steps in all (default {d.steps})"
    )
    parser.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    parser.add_argument(
        "--lr", type=float, default=d.learning_rate, help=f"AdamW learning rate (default {d.learning_rate})"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=d.resolution,
        help=f"training side in pixels, a multiple of {C.SD_SIZE_MULTIPLE} (default {d.resolution})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"photos per step (default {d.batch_size})"
    )
    parser.add_argument(
        "--center-crop",
        action="store_true",
        help="train on the centre square of each photo, unflipped (default: a random square, flipped half "
        "the time)",
    )
    parser.add_argument(
        "--prior-preservation",
        action="store_true",
        help="DreamBooth's prior-preservation loss on class images (needs --class-prompt)",
    )
    parser.add_argument(
        "--class-prompt", default=None, help='what the class looks like, e.g. "a photo of a girl"'
    )
    parser.add_argument(
        "--class-images",
        type=Path,
        default=None,
        help="folder of class images; missing ones are generated there (default OUTPUT/class-images)",
    )
    parser.add_argument(
        "--num-class-images",
        type=int,
        default=d.num_class_images,
        help=f"class images to use, generating the missing ones (default {d.num_class_images})",
    )
    parser.add_argument(
        "--class-inference-steps",
        type=int,
        default=d.class_inference_steps,
        help=f"denoising steps per generated class image (default {d.class_inference_steps})",
    )
    parser.add_argument(
        "--prior-loss-weight",
        type=float,
        default=d.prior_loss_weight,
        help=f"weight of the class images' loss (default {d.prior_loss_weight})",
    )
    parser.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="also train LoRA factors in the text encoder's attention",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help=f"steps between checkpoints in OUTPUT/checkpoint-<step>/ (default {d.checkpoint_every})",
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of every random draw (default {d.seed})"
    )
    parser.add_argument(
        "--device",
        default=d.device,
        help=f"auto (CUDA when there is one), cpu, cuda or cuda:N (default {d.device})",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISIONS,
        default=d.mixed_precision,
        help="fp16: half-precision forward passes on CUDA (default no)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"folder for the checkpoints and {LORA_FILENAME} (default ./{DEFAULT_OUTPUT})",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """The :class:`TrainOptions` of parsed :func:`add_arguments` flags (ValueError for bad values)."""
    return TrainOptions(
        steps=args.steps,
        rank=args.rank,
        learning_rate=args.lr,
        resolution=args.resolution,
        batch_size=args.batch_size,
        augment=not args.center_crop,
        prior_preservation=args.prior_preservation,
        class_prompt=args.class_prompt,
        class_images=args.class_images,
        num_class_images=args.num_class_images,
        class_inference_steps=args.class_inference_steps,
        prior_loss_weight=args.prior_loss_weight,
        train_text_encoder=args.train_text_encoder,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
        mixed_precision=args.mixed_precision,
    )
