"""preprocess: validate the request, decode the photo, SAM's decoder prompt, and the (cached) image embedding.

Both public models start here. ``isekai`` asks for the resolved options too (``character`` ... ``format``), so
only its requests check the character against the store; ``isekai_segment`` asks for the SAM tensors alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from isekai import constants as C
from isekai.ensemble.cache import EmbeddingCache
from isekai.ensemble.characters import CharacterStore
from isekai.ensemble.requests import validate_options, validate_segment
from isekai.ensemble.sam_transforms import SamTransform
from isekai.serving import metrics, triton

OPTION_NAMES = ("character", "prompt", "strength", "steps", "guidance", "seed", "format")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = triton.load_config(args)
        params = triton.parameters(config)
        self.cache = EmbeddingCache(
            int(params.get("cache_entries", C.EMBEDDING_CACHE_ENTRIES)),
            int(params.get("cache_bytes", C.EMBEDDING_CACHE_BYTES)),
        )
        self.characters = CharacterStore(Path(args["model_repository"]).parent)
        self.sam = SamTransform()
        self.name = args["model_name"]
        self.metrics = metrics.cache_metrics(self.name)

    def execute(self, requests: list) -> list:
        responses = triton.respond_each(requests, self._handle, self.name)
        self.metrics.update(self.cache.stats())
        return responses

    def _handle(self, request) -> list:
        wanted = set(request.requested_output_names())
        out = {}
        if "character" in wanted:  # an isekai request: options first, they cost no image decode
            out.update(self._options(request))
        seg = validate_segment(
            triton.required_input(request, "image"),
            triton.required_input(request, "points"),
            triton.required_input(request, "labels"),
            triton.optional_input(request, "box"),
            triton.optional_input(request, "mask_input"),
        )
        size = seg.image.shape[:2]
        out.update(self.sam.decoder_inputs(seg.clicks.points, seg.clicks.labels, seg.clicks.box, size,
                                           mask_input=seg.mask_input))
        out[C.SAM_DEC_IN_EMBEDDINGS] = self._embeddings(seg.image_key, seg.image)
        out["rgb"] = seg.image
        return [triton.tensor(name, value) for name, value in out.items() if name in wanted]

    def _options(self, request) -> dict[str, np.ndarray]:
        """The isekai options with defaults filled in; the character must exist before any model runs."""
        options = validate_options(**{n: triton.optional_input(request, n) for n in OPTION_NAMES})
        character = self.characters.get(options.character)
        return {
            "character": np.array([character.name.encode()], dtype=np.object_),
            "prompt": np.array([(options.prompt or "").encode()], dtype=np.object_),
            "strength": np.array([options.strength], np.float32),
            "steps": np.array([options.steps], np.int32),
            "guidance": np.array([options.guidance], np.float32),
            "seed": np.array([options.seed], np.int64),
            "format": np.array([options.format.encode()], dtype=np.object_),
        }

    def _embeddings(self, key: str, rgb: np.ndarray) -> np.ndarray:
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        embeddings = triton.call(
            C.SAM_ENCODER_MODEL, {C.SAM_ENC_IN_IMAGE: self.sam.encoder_input(rgb)}, [C.SAM_ENC_OUT_EMBEDDINGS]
        )[C.SAM_ENC_OUT_EMBEDDINGS]
        self.cache.put(key, embeddings)
        return embeddings
