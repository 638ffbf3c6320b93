"""compose: the character cut by its silhouette and pasted onto the background.

The silhouette is the person's own mask carried into the crop (config parameter ``silhouette`` "person_mask",
the default), or SAM run again on the generated crop ("sam": one more SAM encode per swap; see
:func:`isekai.ensemble.compose.character_silhouette`). The scene leaves as uint8 [H, W, 3] RGB (``scene``) for
finish to upscale and encode; the background is encoded here.
"""

from __future__ import annotations

import numpy as np

from isekai import constants as C
from isekai.ensemble.compose import compose_scene
from isekai.ensemble.crops import CropGeometry
from isekai.ensemble.images import encode_image
from isekai.ensemble.sam_transforms import SamTransform
from isekai.serving import triton


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = args["model_name"]
        self.sam = SamTransform()
        source = triton.parameters(triton.load_config(args)).get("silhouette", C.DEFAULT_SILHOUETTE)
        if source not in C.SILHOUETTE_SOURCES:
            raise ValueError(f"{self.name}: parameter silhouette should be one of {C.SILHOUETTE_SOURCES} but "
                             f"is {source!r}")
        self.silhouette_by_sam = source == "sam"

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

    def _silhouette_logits(self, character: np.ndarray, box: np.ndarray) -> np.ndarray:
        """SAM's mask logits of the generated crop, prompted by the person's box (no cache: every crop is
        new)."""
        embeddings = triton.call(C.SAM_ENCODER_MODEL, {C.SAM_ENC_IN_IMAGE: self.sam.encoder_input(character)},
                                 [C.SAM_ENC_OUT_EMBEDDINGS])[C.SAM_ENC_OUT_EMBEDDINGS]
        feed = self.sam.decoder_inputs(None, None, box, character.shape[:2], embeddings=embeddings)
        return triton.call(C.SAM_DECODER_MODEL, feed, [C.SAM_DEC_OUT_MASKS])[C.SAM_DEC_OUT_MASKS]

    def _handle(self, request) -> list:
        rgb = triton.required_input(request, "rgb")
        fmt = triton.optional_text(request, "format") or C.DEFAULT_FORMAT
        if not bool(triton.required_input(request, "found").reshape(-1)[0]):
            # A click on nothing: the documented outcome is the photo itself, as result and as background.
            return [triton.tensor("scene", rgb), triton.bytes_tensor("background", encode_image(rgb, fmt))]
        character = triton.required_input(request, "character_crop")
        person_geometry = CropGeometry.from_array(triton.required_input(request, "person_geometry"))
        logits = None  # the person's own mask
        if self.silhouette_by_sam:
            logits = self._silhouette_logits(character, triton.required_input(request, "character_box"))
        result, background = compose_scene(
            rgb,
            triton.required_input(request, "person_mask"),
            triton.required_input(request, "hole"),
            triton.required_input(request, "inpainted"),
            CropGeometry.from_array(triton.required_input(request, "lama_geometry")),
            character,
            logits,
            person_geometry,
        )
        return [triton.tensor("scene", result),
                triton.bytes_tensor("background", encode_image(background, fmt))]
