"""The default profile's ONNX models: onnxruntime inside a Python-backend model, on the ``model.onnx`` beside it.

Any machine without a GPU or a container can serve the exported graphs this way; the ``gpu`` profile serves the very
same files with Triton's own onnxruntime/tensorrt backends instead. Each ``model_repository/<model>/1/model.py``
of an ONNX model is this class and nothing else.

With ``max_batch_size > 0`` and dynamic batching, Triton hands ``execute`` several requests at once; the Python
backend does not concatenate them, so this does: requests whose non-batch shapes agree run as one onnxruntime call
(the UNet's guidance pairs of concurrent requests become one batch-4 call), then the outputs are split back.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from isekai import constants as C
from isekai.serving import triton
from isekai.serving.ort_options import session_options


class TritonPythonModel:
    """Serve ``<model>/1/model.onnx`` with onnxruntime's CPU provider."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        self.config = triton.load_config(args)
        self.name = args["model_name"]
        self.batched = self.config.get("max_batch_size", 0) > 0
        path = Path(args["model_repository"]) / args["model_version"] / C.ONNX_FILENAME
        if not path.exists():
            raise FileNotFoundError(
                f"{self.name}: {path} does not exist; export it first (isekai export ... --repository "
                f"{Path(args['model_repository']).parent})"
            )
        self.session = ort.InferenceSession(
            str(path), session_options(triton.parameters(self.config)), providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dtypes = {
            name: pb_utils.triton_string_to_numpy(cfg["data_type"])
            for cfg in self.config["input"]
            for name in [cfg["name"]]
        }

    def _feed(self, request) -> dict[str, np.ndarray]:
        feed = {}
        for name, meta in self.inputs.items():
            value = triton.required_input(request, name).astype(self.dtypes[name], copy=False)
            # A per-item scalar such as the UNet's timestep travels as [B,1] when batched; the graph wants [B].
            if len(meta.shape) == value.ndim - 1 and value.shape[-1] == 1:
                value = value.reshape(value.shape[:-1])
            feed[name] = value
        return feed

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                feed = self._feed(request)
            except Exception as err:  # noqa: BLE001 - this request alone fails
                responses[i] = triton.error_response(err)
                continue
            key = tuple((n, v.shape[1:] if self.batched else v.shape, v.dtype.str) for n, v in feed.items())
            groups[key].append((i, feed))
        for members in groups.values():
            self._run_group(members, responses)
        return responses

    def _run_group(self, members: list[tuple[int, dict[str, np.ndarray]]], responses: list) -> None:
        if len(members) == 1:
            batches = [members[0][1]]
        else:
            batches = [{n: np.concatenate([f[n] for _, f in members]) for n in self.inputs}]
        try:
            outputs = self.session.run(self.output_names, batches[0])
        except Exception as err:  # noqa: BLE001 - onnxruntime rejects shapes/values with its own message
            for i, _ in members:
                responses[i] = triton.error_response(ValueError(f"{self.name}: {err}"))
            return
        offset = 0
        for i, feed in members:
            size = next(iter(feed.values())).shape[0] if len(members) > 1 else None
            parts = outputs if size is None else [o[offset : offset + size] for o in outputs]
            offset += size or 0
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[triton.tensor(n, p) for n, p in zip(self.output_names, parts, strict=True)]
            )

    def finalize(self) -> None:
        self.session = None
