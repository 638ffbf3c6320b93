"""preprocess: validate the request, decode the photo, SAM's decoder prompt, and the (cached) image embedding.

Both public models start here. ``isekai`` asks for the resolved options too (``character`` ... ``upscale``), so
only its requests check the character against the store, the upscaled result's size against the limits, and the
repository for an upscale graph; ``isekai_segment`` asks for the SAM tensors alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from isekai import constants as C
from isekai.ensemble.cache import EmbeddingCache
from isekai.ensemble.characters import CharacterStore
from isekai.ensemble.finish import require_upscale_graph
from isekai.ensemble.requests import SwapOptions, check_result_size, validate_options, validate_segment
from isekai.ensemble.sam_transforms import SamTransform
from isekai.serving import metrics, triton

OPTION_NAMES = ("character", "prompt", "strength", "steps", "guidance", "seed", "format", "upscale")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = triton.load_config(args)
        params = triton.parameters(config)
        self.cache = EmbeddingCache(
            int(params.get("cache_entries", C.EMBEDDING_CACHE_ENTRIES)),
            int(params.get("cache_bytes", C.EMBEDDING_CACHE_BYTES)),
        )
        self.repository = Path(args["model_repository"]).parent
        self.characters = CharacterStore(self.repository)
        self.sam = SamTransform()
        self.name = args["model_name"]
        self.metrics = metrics.cache_metrics(self.name)

    def execute(self, requests: list) -> list:
        responses = triton.respond_each(requests, self._handle, self.name)
        self.metrics.update(self.cache.stats())
        return responses

    def _handle(self, request) -> list:
        wanted = set(request.requested_output_names())
        out, options = {}, None
        if "character" in wanted:  # an isekai request: options first, they cost no image decode
            options, tensors = self._options(request)
            out.update(tensors)
        seg = validate_segment(
            triton.required_input(request, "image"),
            triton.required_input(request, "points"),
            triton.required_input(request, "labels"),
            triton.optional_input(request, "box"),
            triton.optional_input(request, "mask_input"),
        )
        size = seg.image.shape[:2]
        if options is not None:  # the result's size needs the photo's: after the decode, before any model
            check_result_size(options, size)
        out.update(self.sam.decoder_inputs(seg.clicks.points, seg.clicks.labels, seg.clicks.box, size,
                                           mask_input=seg.mask_input))
        out[C.SAM_DEC_IN_EMBEDDINGS] = self._embeddings(seg.image_key, seg.image)
        out["rgb"] = seg.image
        return [triton.tensor(name, value) for name, value in out.items() if name in wanted]

    def _options(self, request) -> tuple[SwapOptions, dict[str, np.ndarray]]:
        """The isekai options with defaults filled in, and as the tensors passed on; the character must exist, and
        the repository must have an upscale graph if one is asked for, before any model runs."""
        options = validate_options(**{n: triton.optional_input(request, n) for n in OPTION_NAMES})
        character = self.characters.get(options.character)
        require_upscale_graph(options.upscale, self.repository)
        return options, {
            "character": np.array([character.name.encode()], dtype=np.object_),
            "prompt": np.array([(options.prompt or "").encode()], dtype=np.object_),
            "strength": np.array([options.strength], np.float32),
            "steps": np.array([options.steps], np.int32),
            "guidance": np.array([options.guidance], np.float32),
            "seed": np.array([options.seed], np.int64),
            "format": np.array([options.format.encode()], dtype=np.object_),
            "upscale": np.array([options.upscale], np.int32),
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
