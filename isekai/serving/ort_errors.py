"""Whose fault an onnxruntime failure is, without importing Triton.

onnxruntime checks a run's feed against the graph before it runs anything: an input of the wrong rank, size or
element type raises its ``InvalidArgument`` ("Got invalid dimensions for input: x ...", "Unexpected input data
type ..."). The serving code converts every input to the dtype its config declares and Triton checks the
config's dims first, so what reaches that check is a shape the config allows and the graph does not: the
caller's input, refused by the graph. Everything else is the server's fault: a kernel failing mid-graph
(``Fail``, ``RuntimeException``), memory that cannot be allocated ("Failed to allocate memory for requested
buffer ..."), a provider error, or a TensorRT plan failing to run.

:func:`run_error` turns such an exception into the error the adapter answers with: ``ValueError`` (the
request's fault: INVALID_ARGUMENT) or :class:`ModelRunError` (the server's: INTERNAL, logged with the request
ids).
"""

from __future__ import annotations


class ModelRunError(RuntimeError):
    """A graph failed to run for reasons that are not the request's (out of memory, a kernel error)."""


def is_invalid_argument(err: BaseException) -> bool:
    """Whether ``err`` is onnxruntime refusing the feed itself (``InvalidArgument``), before any node runs."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument  # noqa: PLC0415 - optional here
    except ImportError:  # a TensorRT-only image: nothing of onnxruntime can have raised
        return False
    return isinstance(err, InvalidArgument)


def run_error(model: str, err: BaseException) -> ValueError | ModelRunError:
    """The error a request gets when ``model``'s graph raised ``err`` (see the module docstring)."""
    text = " ".join(str(err).split())  # onnxruntime's messages span lines
    if is_invalid_argument(err):
        return ValueError(f"{model}: the graph refused the inputs: {text}")
    return ModelRunError(f"{model}: running the graph failed: {type(err).__name__}: {text}")
