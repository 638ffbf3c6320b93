"""The small surface every ``model.py`` shares: read request tensors, answer each request, call other models.

Only imported inside Triton's Python-backend stub, where ``triton_python_backend_utils`` exists.

Two rules from Triton's python_backend examples, and from what they get wrong:
- one bad request fails alone: :func:`respond_each` turns a ``ValueError`` into ``INVALID_ARG`` for that
  request and answers the others normally;
- every model-to-model call goes through :func:`call`, which checks the response it just received for an error and
  raises with the callee's name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import triton_python_backend_utils as pb_utils

log = logging.getLogger("isekai")


class ModelCallError(RuntimeError):
    """A BLS call to another model failed; ``invalid_argument`` tells whether the callee blamed the input."""

    def __init__(self, model: str, message: str, invalid_argument: bool) -> None:
        super().__init__(f"{model}: {message}")
        self.invalid_argument = invalid_argument


# ---------------------------------------------------------------------------------------------------------------
# Reading requests
# ---------------------------------------------------------------------------------------------------------------
def optional_input(request, name: str) -> np.ndarray | None:
    """The named input as numpy, or None when the caller left this optional input out."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(request, name: str) -> np.ndarray:
    value = optional_input(request, name)
    if value is None:
        raise ValueError(f"input '{name}' is required")
    return value


def optional_bytes(request, name: str) -> bytes | None:
    """A BYTES [1] input as bytes (None when absent)."""
    value = optional_input(request, name)
    if value is None:
        return None
    if value.size != 1:
        raise ValueError(f"input '{name}' must hold exactly one element, got shape {list(value.shape)}")
    item = value.reshape(-1)[0]
    return item if isinstance(item, bytes) else bytes(item)


def optional_text(request, name: str) -> str | None:
    raw = optional_bytes(request, name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"input '{name}' must be UTF-8 text: {err}") from None


def optional_scalar(request, name: str) -> float | int | None:
    value = optional_input(request, name)
    if value is None:
        return None
    if value.size != 1:
        raise ValueError(f"input '{name}' must hold exactly one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0].item()


def bytes_tensor(name: str, data: bytes) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([data], dtype=np.object_))


def tensor(name: str, array: np.ndarray) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.ascontiguousarray(array))


# ---------------------------------------------------------------------------------------------------------------
# Answering requests
# ---------------------------------------------------------------------------------------------------------------
def error_response(err: Exception) -> pb_utils.InferenceResponse:
    invalid = isinstance(err, ValueError) or (isinstance(err, ModelCallError) and err.invalid_argument)
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code))


def respond_each(
    requests: Sequence, handle: Callable[[object], Sequence[pb_utils.Tensor]], model: str
) -> list[pb_utils.InferenceResponse]:
    """Run ``handle`` per request; exactly one response per request, errors confined to their request."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=list(handle(request))))
        except Exception as err:  # noqa: BLE001 - every failure becomes that request's error response
            if not isinstance(err, ValueError | ModelCallError):
                log.exception("%s: request failed", model)
            responses.append(error_response(err))
    return responses


def parameters(model_config: Mapping) -> dict[str, str]:
    """The config's ``parameters { key: ... value: { string_value: ... } }`` as a plain dict."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def load_config(args: Mapping[str, str]) -> dict:
    return json.loads(args["model_config"])


# ---------------------------------------------------------------------------------------------------------------
# Calling other models (BLS)
# ---------------------------------------------------------------------------------------------------------------
def call(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    timings: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` on ``inputs`` through BLS and return the requested outputs as numpy.

    Raises :class:`ModelCallError` naming ``model`` when the response it just received carries an error.
    """
    started = time.perf_counter()
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=list(outputs),
        inputs=[tensor(name, value) for name, value in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        error = response.error()
        invalid = getattr(error, "code", lambda: None)() == pb_utils.TritonError.INVALID_ARG
        raise ModelCallError(model, error.message(), invalid)
    result = {}
    for name in outputs:
        out = pb_utils.get_output_tensor_by_name(response, name)
        if out is None:
            raise ModelCallError(model, f"response has no output '{name}'", False)
        result[name] = out.as_numpy()
    if timings is not None:
        timings[model] = timings.get(model, 0.0) + time.perf_counter() - started
    return result
