"""diffusion: the person crop redrawn as the character (img2img through BLS calls to the exported SD graphs).

The step itself is :class:`isekai.serving.diffusion_step.DiffusionStep`, which ``isekai_stream`` runs too
(with progress and cancellation): this adapter only reads the request's inputs and answers it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from isekai.serving import triton
from isekai.serving.diffusion_step import INPUTS, OUTPUT, DiffusionStep


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        # Only the scheduler arithmetic runs here; the heavy math is in the ONNX models' own thread pools.
        torch.set_num_threads(1)
        self.name = args["model_name"]
        self.step = DiffusionStep(Path(args["model_repository"]).parent)

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

    def _handle(self, request) -> list:
        values = {name: triton.optional_input(request, name) for name in INPUTS}
        return [triton.tensor(OUTPUT, self.step.run(values))]
