"""An exported graph a repository may lack (``OPTIONAL_ONNX_MODELS``: Real-ESRGAN's ``upscale``), served
anyway.

:class:`isekai.serving.onnx_model.TritonPythonModel` refuses to load without its ``model.onnx``, and a model
that fails to load at startup makes tritonserver exit (``--exit-on-error`` is on by default, and
``isekai serve`` loads every model). For the graphs every swap needs that is right; for an optional one it
would stop every repository exported without it (older ones, users without the checkpoint,
``k8s/export-and-upload.sh``) from starting. So this adapter loads without the graph, answers each request
with UNAVAILABLE naming the export command, and opens the graph at the first request after it appears
(exported while the server runs). With the graph it is the ONNX adapter unchanged: onnxruntime on the CPU, or
its CUDA provider with ``execution_provider: cuda`` (the ``gpu`` and ``tensorrt`` profiles). Callers should
not get that far: preprocess refuses a request for an upscale the repository cannot give before any model runs
(:func:`isekai.ensemble.finish.require_upscale_graph`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import triton_python_backend_utils as pb_utils

from isekai import constants as C
from isekai.ensemble.finish import missing_graph_message
from isekai.serving import onnx_model

log = logging.getLogger("isekai")


class TritonPythonModel(onnx_model.TritonPythonModel):
    """``<model>/1/model.onnx`` through onnxruntime once it exists; UNAVAILABLE for each request until
    then."""

    def initialize(self, args: dict[str, str]) -> None:
        self.name = args["model_name"]
        self._args = args
        self._graph = Path(args["model_repository"]) / args["model_version"] / C.ONNX_FILENAME
        self._graph_open = False
        if self._graph.is_file():
            self._open_graph()
        else:
            log.warning("%s: %s does not exist; loaded without it, every request is refused until it is "
                        "exported",
                        self.name, self._graph)

    def _missing(self) -> str:
        """The refusal's message (callers see it: no server paths)."""
        if self.name == C.UPSCALE_MODEL:
            return missing_graph_message()
        return (f"the model repository has no graph {self.name}/{C.MODEL_VERSION}/{C.ONNX_FILENAME}: "
                "export it first")

    def _open_graph(self) -> None:
        super().initialize(self._args)
        self._graph_open = True

    def execute(self, requests: list) -> list:
        if not self._graph_open and self._graph.is_file():
            try:
                self._open_graph()
            except Exception as err:  # a broken (or half-written) export is the server's fault
                log.exception("%s: opening %s failed; the next request tries again", self.name, self._graph)
                error = pb_utils.TritonError(f"{self.name}: opening its graph failed ({type(err).__name__}; "
                                             "see the server log)", pb_utils.TritonError.INTERNAL)
                return [pb_utils.InferenceResponse(error=error) for _ in requests]
        if not self._graph_open:
            error = pb_utils.TritonError(f"{self.name}: {self._missing()}", pb_utils.TritonError.UNAVAILABLE)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return super().execute(requests)

    def finalize(self) -> None:
        if self._graph_open:
            super().finalize()
