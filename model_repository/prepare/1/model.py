"""prepare: SAM's answer -> the public mask and score, and the crops LaMa and Stable Diffusion work on.

Also the swaps' admission (``isekai.ensemble.admission``): the last step a swap passes alone before LaMa and
the diffusion run side by side, so it refuses one while diffusion's queue is full."""

from __future__ import annotations

import os

import numpy as np

from isekai import constants as C
from isekai.ensemble.admission import Admission, metrics_url
from isekai.ensemble.compose import prepare_person, public_mask
from isekai.serving import triton


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = args["model_name"]
        params = triton.parameters(triton.load_config(args))
        url = os.environ.get(C.METRICS_URL_ENV) or metrics_url("127.0.0.1", C.DEFAULT_METRICS_PORT)
        self.admission = Admission(url, limit=int(params.get("max_waiting_swaps", C.DIFFUSION_MAX_WAITING)))

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

    def _handle(self, request) -> list:
        self.admission.admit()
        rgb = triton.required_input(request, "rgb")
        masks = triton.required_input(request, C.SAM_DEC_OUT_MASKS)
        iou = triton.required_input(request, C.SAM_DEC_OUT_IOU)
        p = prepare_person(rgb, masks, triton.required_input(request, "points"),
                           triton.required_input(request, "labels"))
        return [
            triton.bytes_tensor("mask", public_mask(masks)),
            triton.tensor("score", iou.reshape(1).astype(np.float32)),
            triton.tensor("found", np.array([p.found])),
            triton.tensor("person_mask", p.mask.astype(np.uint8)),
            triton.tensor("hole", p.hole.astype(np.uint8)),
            triton.tensor("lama_image", p.lama_image),
            triton.tensor("lama_mask", p.lama_mask),
            triton.tensor("lama_geometry", p.lama_geometry.to_array()),
            triton.tensor("person_crop", p.person_image),
            triton.tensor("person_geometry", p.person_geometry.to_array()),
            triton.tensor("character_box", p.character_box),
        ]
