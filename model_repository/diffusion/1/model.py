"""diffusion: the person crop redrawn as the character (img2img through BLS calls to the exported SD graphs).

The character is resolved once per request (:class:`CharacterStore`); the unet and text_encoder calls name it as
``NAME@REVISION``, so they run its LoRA adapter or its own graph, and a character written again mid-request is
never mixed with its older self.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from isekai import constants as C
from isekai.ensemble.characters import CharacterStore, text_embeddings
from isekai.ensemble.diffusion import DiffusionOptions, img2img
from isekai.serving import triton


def _key_tensor(key: str, rows: int) -> np.ndarray:
    """The ``character`` input of a batched model: one key per row, BYTES [rows, 1]."""
    return np.array([[key.encode()]] * rows, dtype=np.object_)


def _text_encode(key: str, ids: np.ndarray) -> np.ndarray:
    inputs = {C.TEXT_IN_IDS: ids, C.SD_IN_CHARACTER: _key_tensor(key, ids.shape[0])}
    return triton.call(C.TEXT_ENCODER_MODEL, inputs, [C.TEXT_OUT_HIDDEN])[C.TEXT_OUT_HIDDEN]


def _vae_encode(sample: np.ndarray) -> np.ndarray:
    return triton.call(C.VAE_ENCODER_MODEL, {C.VAE_ENC_IN_SAMPLE: sample}, [C.VAE_ENC_OUT_MEAN])[C.VAE_ENC_OUT_MEAN]


def _vae_decode(latent: np.ndarray) -> np.ndarray:
    return triton.call(C.VAE_DECODER_MODEL, {C.VAE_DEC_IN_LATENT: latent}, [C.VAE_DEC_OUT_SAMPLE])[C.VAE_DEC_OUT_SAMPLE]


def _unet(key: str, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    inputs = {
        C.UNET_IN_SAMPLE: sample,
        C.UNET_IN_TIMESTEP: timestep.reshape(-1, 1),
        C.UNET_IN_HIDDEN: hidden,
        C.SD_IN_CHARACTER: _key_tensor(key, sample.shape[0]),
    }
    return triton.call(C.UNET_MODEL, inputs, [C.UNET_OUT_SAMPLE])[C.UNET_OUT_SAMPLE]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # Only the scheduler arithmetic runs here; the heavy math is in the ONNX models' own thread pools.
        torch.set_num_threads(1)
        self.name = args["model_name"]
        self.repository = Path(args["model_repository"]).parent
        self.characters = CharacterStore(self.repository)

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

    def _handle(self, request) -> list:
        crop = triton.required_input(request, "person_crop")
        if not bool(triton.required_input(request, "found").reshape(-1)[0]):
            return [triton.tensor("character_crop", crop)]  # nobody to redraw; compose returns the photo
        character = self.characters.get(triton.optional_text(request, "character"))
        prompt = triton.optional_text(request, "prompt")
        tokenizer = self.characters.tokenizer() if prompt else None  # re-read when its files change
        embeddings = text_embeddings(character, prompt, tokenizer, partial(_text_encode, character.key))
        options = DiffusionOptions(
            steps=int(triton.optional_scalar(request, "steps")),
            strength=float(triton.optional_scalar(request, "strength")),
            guidance=float(triton.optional_scalar(request, "guidance")),
            seed=int(triton.optional_scalar(request, "seed")),
        )
        config = self.characters.config
        out = img2img(crop, embeddings, options, vae_encode=_vae_encode, unet=partial(_unet, character.key),
                      vae_decode=_vae_decode, scheduler_config=config.scheduler_config,
                      scaling_factor=config.scaling_factor)
        return [triton.tensor("character_crop", out)]
