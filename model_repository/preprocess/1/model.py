"""preprocess: validate the request, decode the photo, SAM's decoder prompt, and the (cached) image embedding.

Both public models start here. ``isekai`` asks for the resolved options too (``character`` ... ``upscale``),
so only its requests check the character against the store, the upscaled result's size against the limits, and
the repository for an upscale graph; ``isekai_segment`` asks for the SAM tensors alone.

The embedding comes from the ``embedding_cache`` model, else from ``sam_encoder`` (then stored there), keyed
by the encoder graph's identity on disk, which sam_encoder is asked to confirm (:class:`EmbeddingSource`).
Several instances of this model share that one cache, so a click is served while another instance waits on an
encode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isekai import constants as C
from isekai.ensemble.cache import EmbeddingSource, GraphMismatch, graph_identity
from isekai.ensemble.characters import CharacterStore
from isekai.ensemble.finish import require_upscale_graph
from isekai.ensemble.requests import (
    SwapOptions,
    check_default_steps,
    check_result_size,
    validate_options,
    validate_segment,
)
from isekai.ensemble.sam_transforms import SamTransform
from isekai.serving import triton

OPTION_NAMES = ("character", "prompt", "strength", "steps", "guidance", "seed", "format", "upscale")


def _cached(key: str) -> np.ndarray | None:
    out = triton.call(C.EMBEDDING_CACHE_MODEL, {"key": np.array([key.encode()], dtype=np.object_)},
                      [C.SAM_ENC_OUT_EMBEDDINGS, "found"])
    return out[C.SAM_ENC_OUT_EMBEDDINGS] if bool(out["found"].reshape(-1)[0]) else None


def _store(key: str, embeddings: np.ndarray) -> None:
    inputs = {"key": np.array([key.encode()], dtype=np.object_), C.SAM_ENC_OUT_EMBEDDINGS: embeddings}
    triton.call(C.EMBEDDING_CACHE_MODEL, inputs, ["found"])


def _encode(pixels: np.ndarray, graph: str | None) -> np.ndarray:
    """sam_encoder's embedding of ``pixels``; with ``graph``, only that graph's (else
    :class:`GraphMismatch`)."""
    try:
        return triton.call(C.SAM_ENCODER_MODEL, {C.SAM_ENC_IN_IMAGE: pixels}, [C.SAM_ENC_OUT_EMBEDDINGS],
                           parameters={C.GRAPH_PARAMETER: graph} if graph else None)[C.SAM_ENC_OUT_EMBEDDINGS]
    except triton.ModelCallError as err:
        if C.GRAPH_MISMATCH in str(err):
            raise GraphMismatch(str(err)) from None
        raise


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.repository = Path(args["model_repository"]).parent
        encoder_folder = self.repository / C.SAM_ENCODER_MODEL / C.MODEL_VERSION
        self.embeddings = EmbeddingSource(lambda: graph_identity(encoder_folder), _cached, _store, _encode)
        self.characters = CharacterStore(self.repository)
        self.sam = SamTransform()
        self.name = args["model_name"]

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

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
        pixels = lambda: self.sam.encoder_input(seg.image)  # noqa: E731 - only made on a cache miss
        out[C.SAM_DEC_IN_EMBEDDINGS] = self.embeddings.get(seg.image_key, pixels)
        out["rgb"] = seg.image
        return [triton.tensor(name, value) for name, value in out.items() if name in wanted]

    def _options(self, request) -> tuple[SwapOptions, dict[str, np.ndarray]]:
        """The isekai options with defaults filled in, and as the tensors passed on; the character must exist,
        and the repository must have an upscale graph if one is asked for, before any model runs."""
        options = validate_options(**{n: triton.optional_input(request, n) for n in OPTION_NAMES})
        character = self.characters.get(options.character)
        check_default_steps(options, self.characters.config.sampling_defaults[0])
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
