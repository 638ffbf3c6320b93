"""The small surface every ``model.py`` shares: read request tensors, answer each request, call other models.

Only imported inside Triton's Python-backend stub, where ``triton_python_backend_utils`` exists.

Two rules from Triton's python_backend examples, and from what they get wrong:
- one bad request fails alone: :func:`respond_each` turns a ``ValueError`` into ``INVALID_ARG`` for that
  request and answers the others normally;
- every model-to-model call goes through :func:`call`, which checks the response it just received for an error
  and raises with the callee's name.

Every BLS call has a deadline (:func:`call`): the calling request's own timeout when its client set one
(Triton's ``timeout`` request parameter, in microseconds, which an ensemble hands to each of its steps),
counted from when this stage began the request, else :data:`isekai.constants.BLS_TIMEOUT_S` per call. Past it
the call raises :class:`ModelCallError` naming the callee, and the request fails with INTERNAL instead of
hanging on a stuck model.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import triton_python_backend_utils as pb_utils

from isekai import constants as C
from isekai.ensemble.admission import Busy

log = logging.getLogger("isekai")

# Monotonic time (seconds) by which the BLS calls made for the request being handled must be answered; None:
# no deadline of the request's own (each call gets BLS_TIMEOUT_S). Set by :func:`request_deadline`.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("isekai_bls_deadline", default=None)
# The id of that request (its client's, or "" when it gave none), for the log line of a call given up.
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("isekai_request_id", default="")


class ModelCallError(RuntimeError):
    """A BLS call to another model failed; ``invalid_argument`` tells whether the callee blamed the input."""

    def __init__(self, model: str, message: str, invalid_argument: bool) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.detail = message  # the callee's own message (a caller's fault is told in the callee's words)
        self.invalid_argument = invalid_argument


# ------------------------------------------------------------------------------------------------------------
# Reading requests
# ------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------
# Answering requests
# ------------------------------------------------------------------------------------------------------------
def error_response(err: Exception) -> pb_utils.InferenceResponse:
    invalid = isinstance(err, ValueError) or (isinstance(err, ModelCallError) and err.invalid_argument)
    if isinstance(err, Busy):
        code = pb_utils.TritonError.UNAVAILABLE  # a full queue: "busy, retry later", as Triton's own refusal
    else:
        code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code))


def respond_each(
    requests: Sequence, handle: Callable[[object], Sequence[pb_utils.Tensor]], model: str
) -> list[pb_utils.InferenceResponse]:
    """Run ``handle`` per request; exactly one response per request, errors confined to their request."""
    responses = []
    for request in requests:
        try:
            with request_deadline(request):
                responses.append(pb_utils.InferenceResponse(output_tensors=list(handle(request))))
        except Exception as err:  # every failure becomes that request's error response
            if not isinstance(err, ValueError | ModelCallError | Busy):
                log.exception("%s: request failed", model)
            responses.append(error_response(err))
    return responses


def parameters(model_config: Mapping) -> dict[str, str]:
    """The config's ``parameters { key: ... value: { string_value: ... } }`` as a plain dict."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def load_config(args: Mapping[str, str]) -> dict:
    return json.loads(args["model_config"])


# ------------------------------------------------------------------------------------------------------------
# Calling other models (BLS)
# ------------------------------------------------------------------------------------------------------------
def request_timeout_s(request) -> float | None:
    """The request's own timeout in seconds (its client's ``timeout`` parameter), or None when it set none."""
    timeout_us = getattr(request, "timeout", lambda: 0)()
    return timeout_us / 1e6 if timeout_us else None


@contextlib.contextmanager
def request_deadline(request) -> Iterator[None]:
    """While handling ``request``: its BLS calls (:func:`call`) must be answered within its own timeout,
    counted from now. A stage cannot see when the request reached the server, so each stage gets the whole
    timeout; the client's own deadline still bounds the request as a whole."""
    timeout_s = request_timeout_s(request)
    token = _deadline.set(None if timeout_s is None else time.monotonic() + timeout_s)
    id_token = _request_id.set(getattr(request, "request_id", lambda: "")() or "")
    try:
        yield
    finally:
        _deadline.reset(token)
        _request_id.reset(id_token)


def _call_timeout_s(model: str) -> tuple[float, str]:
    """Seconds ``model`` has to answer a call made now, and where that limit comes from (for the error)."""
    deadline = _deadline.get()
    if deadline is None:
        return C.BLS_TIMEOUT_S, "BLS_TIMEOUT_S, the limit of one model-to-model call"
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ModelCallError(model, "not called: the request's timeout had already passed", False)
    return remaining, "the request's timeout"


def _exec(request, model: str, timeout_s: float, why: str):
    """``request.exec()``, given up after ``timeout_s`` seconds.

    The call runs in a thread of its own (Triton's ``async_exec`` does the same: ``exec`` releases the GIL
    while it waits). A callee that never answers keeps that thread; its late answer is dropped. Triton 2.51
    cannot cancel a BLS request, so a stuck callee keeps running: requests calling it fail the same way until
    it recovers or is reloaded.
    """
    outcome: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["response"] = request.exec()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread below
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, name=f"bls-{model}", daemon=True).start()
    if not done.wait(timeout_s):
        message = (
            f"no answer within {timeout_s:.1f} s ({why}): the model is stuck or far behind; request given up"
        )
        log.error("%s: %s (request id %r)", model, message, _request_id.get())
        raise ModelCallError(model, message, False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["response"]


def call(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    timings: dict[str, float] | None = None,
    parameters: Mapping[str, str | int | bool] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` on ``inputs`` through BLS and return the requested outputs as numpy.

    ``parameters`` travel as the request's parameters (the callee reads ``request.parameters()``, a JSON
    object). The call has a deadline (see the module docstring), which also goes to the callee as Triton's
    request timeout (microseconds): a callee whose queue policy allows timeout overrides drops it from its
    queue once it has passed.

    Raises :class:`ModelCallError` naming ``model`` when the response it just received carries an error, or
    when no response came before the deadline.
    """
    started = time.perf_counter()
    timeout_s, why = _call_timeout_s(model)
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=list(outputs),
        inputs=[tensor(name, value) for name, value in inputs.items()],
        parameters=dict(parameters or {}),
        timeout=max(1, int(timeout_s * 1e6)),
    )
    response = _exec(request, model, timeout_s, why)
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
