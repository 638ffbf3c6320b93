"""BLS calls have a deadline (isekai/serving/triton.py): the request's own timeout when its client set one,
else
BLS_TIMEOUT_S per call; a callee that does not answer in time fails the call with a message naming it.

Triton's ``triton_python_backend_utils`` exists only inside a stub, so a stand-in with the few names triton.py
uses is put in its place for this module.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
import types

import numpy as np
import pytest

from isekai import constants as C


class FakeResponse:
    def __init__(self, outputs=None, error=None):
        self.outputs, self._error = outputs or {}, error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


class FakeRequest:
    """A BLS request: ``exec`` answers after ``delay_s`` (None: never, until released)."""

    delay_s: float | None = 0.0
    release = threading.Event()
    made: list[FakeRequest] = []

    def __init__(self, model_name, requested_output_names, inputs, parameters=None, timeout=0):
        self.model_name, self.outputs, self.parameters, self.timeout_us = (
            model_name,
            requested_output_names,
            parameters,
            timeout,
        )
        FakeRequest.made.append(self)

    def exec(self):
        if self.delay_s is None:
            self.release.wait(30)
        else:
            time.sleep(self.delay_s)
        return FakeResponse({name: np.zeros(1) for name in self.outputs})


class Incoming:
    """A request the model is handling, whose client set ``timeout_us`` (0: none)."""

    def __init__(self, timeout_us: int = 0, request_id: str = "r1") -> None:
        self._timeout, self._id = timeout_us, request_id

    def timeout(self):
        return self._timeout

    def request_id(self):
        return self._id


@pytest.fixture
def triton(monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.InferenceRequest = FakeRequest
    fake.Tensor = lambda name, array: (name, array)
    fake.get_output_tensor_by_name = lambda response, name: (
        types.SimpleNamespace(as_numpy=lambda: response.outputs[name]) if name in response.outputs else None
    )
    fake.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(
        outputs=output_tensors, error=error
    )

    class TritonError:
        INTERNAL, INVALID_ARG, UNAVAILABLE = "INTERNAL", "INVALID_ARG", "UNAVAILABLE"

        def __init__(self, message, code=INTERNAL):
            self._message, self._code = message, code

        def message(self):
            return self._message

        def code(self):
            return self._code

    fake.TritonError = TritonError
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "isekai.serving.triton", raising=False)
    FakeRequest.delay_s, FakeRequest.made = 0.0, []
    FakeRequest.release = threading.Event()
    module = importlib.import_module("isekai.serving.triton")
    yield module
    FakeRequest.release.set()
    sys.modules.pop("isekai.serving.triton", None)


def test_a_call_without_a_request_deadline_gets_bls_timeout_s(triton):
    out = triton.call("unet", {"x": np.ones(1)}, ["y"], parameters={C.GRAPH_PARAMETER: "abc"})
    assert list(out) == ["y"]
    (made,) = FakeRequest.made
    assert made.timeout_us == int(C.BLS_TIMEOUT_S * 1e6)
    assert made.parameters == {C.GRAPH_PARAMETER: "abc"}
    json.dumps(made.parameters)  # what the stub sends on: a JSON object of str/int/bool


def test_a_call_past_the_requests_timeout_fails_naming_the_callee(triton):
    FakeRequest.delay_s = None  # a stuck callee
    handled = {}

    def handle(request):
        started = time.monotonic()
        try:
            triton.call("vae_decoder", {"x": np.ones(1)}, ["y"])
        finally:
            handled["took"] = time.monotonic() - started
        return []

    (response,) = triton.respond_each([Incoming(timeout_us=300_000)], handle, "diffusion")
    assert response.error.code() == "INTERNAL"
    message = response.error.message()
    assert message.startswith("vae_decoder: no answer within 0.3 s (the request's timeout)"), message
    assert 0.25 <= handled["took"] < 2.0
    assert 0 < FakeRequest.made[0].timeout_us <= 300_000, "the callee is told the time left too"


def test_every_call_of_a_request_shares_its_deadline(triton):
    FakeRequest.delay_s = 0.15
    errors = []

    def handle(request):
        for _ in range(5):  # 5 x 0.15 s against a 0.4 s timeout: the third call cannot finish in time
            try:
                triton.call("unet", {"x": np.ones(1)}, ["y"])
            except triton.ModelCallError as err:
                errors.append(str(err))
                raise
        return []

    (response,) = triton.respond_each([Incoming(timeout_us=400_000)], handle, "diffusion")
    assert response.error is not None and len(FakeRequest.made) == 3
    assert errors and "unet: no answer within" in errors[0]


def test_a_call_after_the_deadline_is_not_made(triton):
    def handle(request):
        time.sleep(0.12)
        triton.call("unet", {"x": np.ones(1)}, ["y"])
        return []

    (response,) = triton.respond_each([Incoming(timeout_us=100_000)], handle, "diffusion")
    assert "the request's timeout had already passed" in response.error.message()
    assert FakeRequest.made == []


def test_the_deadline_ends_with_its_request(triton):
    FakeRequest.delay_s = 0.0

    def handle(request):
        triton.call("unet", {"x": np.ones(1)}, ["y"])
        return []

    triton.respond_each([Incoming(timeout_us=50_000), Incoming(timeout_us=0)], handle, "diffusion")
    assert FakeRequest.made[0].timeout_us <= 50_000
    assert FakeRequest.made[1].timeout_us == int(C.BLS_TIMEOUT_S * 1e6), "the first request's deadline leaked"
