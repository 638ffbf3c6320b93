"""Whose fault an onnxruntime failure is, on real onnxruntime failures (tests/ort_fault_graph.py)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from isekai.serving.ort_errors import ModelRunError, run_error
from isekai.serving.ort_options import session_options
from tests.ort_fault_graph import HUGE, write_fault_graph


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = write_fault_graph(tmp_path_factory.mktemp("ort") / "model.onnx")
    # the serving code's own options: no memory arena, as the default profile's big models
    return ort.InferenceSession(str(path), session_options({"cpu_mem_arena": "false"}))


def failure(session, x: np.ndarray, n: int) -> BaseException:
    with pytest.raises(Exception) as raised:  # whatever onnxruntime raises is the subject
        session.run(None, {"x": x, "n": np.array([n], np.int64)})
    return raised.value


def test_a_feed_the_graph_refuses_is_the_callers_fault(session):
    err = run_error("ort_fault", failure(session, np.ones(5, np.float32), 4))
    assert isinstance(err, ValueError)
    assert str(err).startswith(
        "ort_fault: the graph refused the inputs:"
    ) and "Got invalid dimensions" in str(err)
    assert "\n" not in str(err)


def test_a_wrong_element_type_is_the_callers_fault(session):
    err = run_error("ort_fault", failure(session, np.ones(3, np.float64), 4))
    assert isinstance(err, ValueError) and "Unexpected input data type" in str(err)


def test_running_out_of_memory_is_the_servers_fault(session):
    err = run_error("ort_fault", failure(session, np.ones(3, np.float32), HUGE))
    assert isinstance(err, ModelRunError) and not isinstance(err, ValueError)
    # without the memory arena (as served) malloc fails: RuntimeException "std::bad_alloc"; with it, the
    # arena's Fail "Failed to allocate memory"
    assert str(err).startswith("ort_fault: running the graph failed: ")
    assert "ConstantOfShape" in str(err) and ("bad_alloc" in str(err) or "allocate" in str(err))


def test_the_session_still_runs_after_its_failures(session):
    y, total = session.run(None, {"x": np.ones(3, np.float32), "n": np.array([4], np.int64)})
    assert y.tolist() == [2.0, 2.0, 2.0] and float(total) == 4.0


def test_anything_else_is_the_servers_fault():
    assert isinstance(run_error("unet", RuntimeError("CUDA error: an illegal memory access")), ModelRunError)
