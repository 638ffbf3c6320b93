"""diffusion: the person crop redrawn as the character (img2img through BLS calls to the exported SD graphs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from isekai import constants as C
from isekai.ensemble.characters import CharacterStore, Tokenizer, text_embeddings
from isekai.ensemble.diffusion import DiffusionOptions, img2img
from isekai.serving import triton


def _text_encode(ids: np.ndarray) -> np.ndarray:
    return triton.call(C.TEXT_ENCODER_MODEL, {C.TEXT_IN_IDS: ids}, [C.TEXT_OUT_HIDDEN])[C.TEXT_OUT_HIDDEN]


def _vae_encode(sample: np.ndarray) -> np.ndarray:
    return triton.call(C.VAE_ENCODER_MODEL, {C.VAE_ENC_IN_SAMPLE: sample}, [C.VAE_ENC_OUT_MEAN])[C.VAE_ENC_OUT_MEAN]


def _vae_decode(latent: np.ndarray) -> np.ndarray:
    return triton.call(C.VAE_DECODER_MODEL, {C.VAE_DEC_IN_LATENT: latent}, [C.VAE_DEC_OUT_SAMPLE])[C.VAE_DEC_OUT_SAMPLE]


def _unet(sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    inputs = {C.UNET_IN_SAMPLE: sample, C.UNET_IN_TIMESTEP: timestep.reshape(-1, 1), C.UNET_IN_HIDDEN: hidden}
    return triton.call(C.UNET_MODEL, inputs, [C.UNET_OUT_SAMPLE])[C.UNET_OUT_SAMPLE]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # Only the scheduler arithmetic runs here; the heavy math is in the ONNX models' own thread pools.
        torch.set_num_threads(1)
        self.name = args["model_name"]
        self.repository = Path(args["model_repository"]).parent
        self.characters = CharacterStore(self.repository)
        self._tokenizer: Tokenizer | None = None

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_repository(self.repository)
        return self._tokenizer

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

    def _handle(self, request) -> list:
        crop = triton.required_input(request, "person_crop")
        if not bool(triton.required_input(request, "found").reshape(-1)[0]):
            return [triton.tensor("character_crop", crop)]  # nobody to redraw; compose returns the photo
        character = self.characters.get(triton.optional_text(request, "character"))
        prompt = triton.optional_text(request, "prompt")
        embeddings = text_embeddings(character, prompt, self.tokenizer() if prompt else None, _text_encode)
        options = DiffusionOptions(
            steps=int(triton.optional_scalar(request, "steps")),
            strength=float(triton.optional_scalar(request, "strength")),
            guidance=float(triton.optional_scalar(request, "guidance")),
            seed=int(triton.optional_scalar(request, "seed")),
        )
        config = self.characters.config
        out = img2img(crop, embeddings, options, vae_encode=_vae_encode, unet=_unet, vae_decode=_vae_decode,
                      scheduler_config=config.scheduler_config, scaling_factor=config.scaling_factor)
        return [triton.tensor("character_crop", out)]
