"""segment_mask: isekai_segment's answer: the same mask PNG as isekai's, the score, and the logits to send
back."""

from __future__ import annotations

import numpy as np

from isekai import constants as C
from isekai.ensemble.compose import public_mask
from isekai.serving import triton


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = args["model_name"]

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

    def _handle(self, request) -> list:
        masks = triton.required_input(request, C.SAM_DEC_OUT_MASKS)
        iou = triton.required_input(request, C.SAM_DEC_OUT_IOU)
        low_res = triton.required_input(request, C.SAM_DEC_OUT_LOW_RES)
        return [
            triton.bytes_tensor("mask", public_mask(masks)),
            triton.tensor("score", iou.reshape(1).astype(np.float32)),
            triton.tensor("low_res_mask", low_res.astype(np.float32)),
        ]
