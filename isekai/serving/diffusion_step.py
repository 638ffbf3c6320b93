"""The diffusion step of a swap: the person crop redrawn as the character (img2img through BLS calls to the
exported SD graphs). Shared by two callers, so a swap draws the same bytes through either:

- ``model_repository/diffusion`` (the ``isekai`` ensemble's step), one request at a time;
- ``model_repository/isekai_stream``, which runs this step in its own stub so that it can report every UNet
  step and stop between two of them when its caller cancels (Triton 2.51's Python backend cannot cancel a BLS
  request it made, so a cancelled stream could not stop a ``diffusion`` model it called).

The character is resolved once per request (:class:`CharacterStore`); the unet and text_encoder calls name it
as ``NAME@REVISION``, so they run its LoRA adapter or its own graph, and a character written again mid-request
is never mixed with its older self. Only imported inside Triton's Python-backend stub (BLS).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np

from isekai import constants as C
from isekai.ensemble.characters import CharacterStore, text_embeddings
from isekai.ensemble.diffusion import DiffusionOptions, Progress, StepLatents, img2img, scheduler_class
from isekai.serving import triton

# The step's inputs (model_repository/diffusion/config.pbtxt) and its one output.
INPUTS = ("person_crop", "found", "character", "prompt", "strength", "steps", "guidance", "seed")
OUTPUT = "character_crop"


def _key_tensor(key: str, rows: int) -> np.ndarray:
    """The ``character`` input of a batched model: one key per row, BYTES [rows, 1]."""
    return np.array([[key.encode()]] * rows, dtype=np.object_)


def _text_encode(key: str, ids: np.ndarray) -> np.ndarray:
    inputs = {C.TEXT_IN_IDS: ids, C.SD_IN_CHARACTER: _key_tensor(key, ids.shape[0])}
    return triton.call(C.TEXT_ENCODER_MODEL, inputs, [C.TEXT_OUT_HIDDEN])[C.TEXT_OUT_HIDDEN]


def _vae_encode(sample: np.ndarray) -> np.ndarray:
    out = triton.call(C.VAE_ENCODER_MODEL, {C.VAE_ENC_IN_SAMPLE: sample}, [C.VAE_ENC_OUT_MEAN])
    return out[C.VAE_ENC_OUT_MEAN]


def _vae_decode(latent: np.ndarray) -> np.ndarray:
    out = triton.call(C.VAE_DECODER_MODEL, {C.VAE_DEC_IN_LATENT: latent}, [C.VAE_DEC_OUT_SAMPLE])
    return out[C.VAE_DEC_OUT_SAMPLE]


def _unet(key: str, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    inputs = {
        C.UNET_IN_SAMPLE: sample,
        C.UNET_IN_TIMESTEP: timestep.reshape(-1, 1),
        C.UNET_IN_HIDDEN: hidden,
        C.SD_IN_CHARACTER: _key_tensor(key, sample.shape[0]),
    }
    return triton.call(C.UNET_MODEL, inputs, [C.UNET_OUT_SAMPLE])[C.UNET_OUT_SAMPLE]


def _text(values: Mapping[str, np.ndarray | None], name: str) -> str | None:
    """A BYTES [1] value as text (None when absent)."""
    value = values.get(name)
    if value is None:
        return None
    item = np.asarray(value).reshape(-1)[0]
    raw = item if isinstance(item, bytes) else bytes(item)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"input '{name}' must be UTF-8 text: {err}") from None


def _scalar(values: Mapping[str, np.ndarray | None], name: str) -> float | int:
    value = values.get(name)
    if value is None:
        raise ValueError(f"input '{name}' is required")
    return np.asarray(value).reshape(-1)[0].item()


class DiffusionStep:
    """The step for one model instance: its repository's characters, loaded once, re-read when they change."""

    def __init__(self, repository: str | Path) -> None:
        self.characters = CharacterStore(Path(repository))

    def run(
        self,
        values: Mapping[str, np.ndarray | None],
        progress: Progress | None = None,
        step_latents: StepLatents | None = None,
    ) -> np.ndarray:
        """The character crop for one request.

        Args:
            values: the step's :data:`INPUTS` by name, as numpy (absent optional ones None or missing):
                ``person_crop`` uint8 [H, W, 3], ``found`` bool [1], ``character``/``prompt`` BYTES [1],
                ``strength``/``guidance`` float32 [1], ``steps`` int32 [1], ``seed`` int64 [1].
            progress, step_latents: passed to :func:`isekai.ensemble.diffusion.img2img` (called after each
                denoising step; an exception raised by ``progress`` ends the loop).

        Returns:
            uint8 [H, W, 3]: the redrawn crop, or ``person_crop`` itself when nobody was found.
        """
        crop = values.get("person_crop")
        if crop is None:
            raise ValueError("input 'person_crop' is required")
        if not bool(_scalar(values, "found")):
            return crop  # nobody to redraw; compose returns the photo
        character = self.characters.get(_text(values, "character"))
        prompt = _text(values, "prompt")
        tokenizer = self.characters.tokenizer() if prompt else None  # re-read when its files change
        embeddings = text_embeddings(character, prompt, tokenizer, partial(_text_encode, character.key))
        # preprocess passes STEPS_UNSET / GUIDANCE_UNSET for options the request left out: None here, so
        # img2img takes the exported scheduler's defaults (4 steps and guidance 1 for LCM, 25 and 7.5 for
        # DPM-Solver++).
        options = DiffusionOptions(
            steps=int(_scalar(values, "steps")) or None,
            strength=float(_scalar(values, "strength")),
            guidance=float(_scalar(values, "guidance")) or None,
            seed=int(_scalar(values, "seed")),
        )
        config = self.characters.config
        return img2img(crop, embeddings, options, vae_encode=_vae_encode, unet=partial(_unet, character.key),
                       vae_decode=_vae_decode, scheduler_config=config.scheduler_config,
                       scaling_factor=config.scaling_factor, scheduler_cls=scheduler_class(config.scheduler),
                       progress=progress, step_latents=step_latents)
