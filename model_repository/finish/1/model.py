"""finish: the composed scene upscaled by the request's factor (the upscale graph through BLS) and encoded."""

from __future__ import annotations

import numpy as np

from isekai import constants as C
from isekai.ensemble.finish import finish_result
from isekai.serving import triton


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = args["model_name"]

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

    @staticmethod
    def _upscale(image: np.ndarray) -> np.ndarray:
        """One tile through the exported graph: f32 [1, 3, h, w] in 0..1 -> f32 [1, 3, s*h, s*w]."""
        return triton.call(C.UPSCALE_MODEL, {C.ESRGAN_IN_IMAGE: image},
                           [C.ESRGAN_OUT_UPSCALED])[C.ESRGAN_OUT_UPSCALED]

    def _handle(self, request) -> list:
        factor = triton.optional_scalar(request, "upscale")
        result = finish_result(
            triton.required_input(request, "scene"),
            C.DEFAULT_UPSCALE if factor is None else int(factor),
            triton.optional_text(request, "format") or C.DEFAULT_FORMAT,
            self._upscale,
        )
        return [triton.bytes_tensor("result", result)]
