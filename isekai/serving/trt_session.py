"""A TensorRT plan behind onnxruntime's ``InferenceSession`` surface, for the ``tensorrt`` profile's Python
models.

Triton's own ``tensorrt_plan`` backend serves one plan per model; the unet and text_encoder of the
``tensorrt`` profile must pick a plan per request (the base's, or a character's own: see
:mod:`isekai.export.tensorrt`), so they run in the Python backend through :mod:`isekai.serving.onnx_model`
with ``runtime: tensorrt``, which opens plans with this class instead of onnxruntime sessions.

Written against TensorRT 10's Python API (``Runtime.deserialize_cuda_engine``, the named-tensor execution
context: ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) and cuda-python's runtime bindings
for device memory (``cudaMalloc``, ``cudaMemcpyAsync``, streams), both in the isekai image (k8s/Dockerfile).
It needs a GPU: its tests skip without one.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _cudart():
    try:
        from cuda.bindings import runtime  # noqa: PLC0415  (cuda-python >= 12.6)
    except ImportError:
        from cuda import cudart as runtime  # noqa: PLC0415  (older cuda-python)
    return runtime


def _check(result, what: str):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA {what} failed: {cudart.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class TensorInfo:
    """What the host reads of an input or output: its name and dims (-1 for a dynamic axis)."""

    name: str
    shape: tuple[int, ...]


class _DeviceBuffer:
    """Device memory that grows to the largest size asked for and is reused between runs."""

    def __init__(self) -> None:
        self.ptr, self.capacity = 0, 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.free()
            self.ptr = _check(_cudart().cudaMalloc(max(nbytes, 1)), "cudaMalloc")
            self.capacity = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            _check(_cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr, self.capacity = 0, 0


class TrtSession:
    """``run(output_names, feeds)`` on a TensorRT plan, with numpy in and out (copies to and from the GPU)."""

    def __init__(self, plan: str | Path, device_id: int = 0) -> None:
        import tensorrt as trt  # noqa: PLC0415

        plan = Path(plan)
        if not plan.is_file():
            raise FileNotFoundError(f"{plan} does not exist: build it with "
                                    "`isekai export tensorrt --repository ...`")
        self._trt = trt
        _check(_cudart().cudaSetDevice(device_id), "cudaSetDevice")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {plan} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(_cudart().cudaStreamCreate(), "cudaStreamCreate")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers = {n: _DeviceBuffer() for n in names}
        self._lock = threading.Lock()  # one execution context: one run at a time

    def get_inputs(self) -> list[TensorInfo]:
        return [TensorInfo(n, tuple(self.engine.get_tensor_shape(n))) for n in self._inputs]

    def get_outputs(self) -> list[TensorInfo]:
        return [TensorInfo(n, tuple(self.engine.get_tensor_shape(n))) for n in self._outputs]

    def run(self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray],
            run_options=None) -> list[np.ndarray]:
        """Run the plan on ``feeds``; ``run_options`` is accepted for onnxruntime's signature and ignored."""
        cudart = _cudart()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            hosts = {}
            for name in self._inputs:
                host = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                hosts[name] = host  # kept alive until the stream is synchronised
                ptr = self._buffers[name].reserve(host.nbytes)
                _check(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self.stream),
                       "copy in")
                if not self.context.set_input_shape(name, host.shape):
                    raise ValueError(f"input {name} shape {list(host.shape)} is outside the plan's profile")
                self.context.set_tensor_address(name, ptr)
            outputs = {}
            for name in self._outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                out = np.empty(shape, dtype=self._dtypes[name])
                self.context.set_tensor_address(name, self._buffers[name].reserve(out.nbytes))
                outputs[name] = out
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT failed to run the plan (its log says why)")
            for name, out in outputs.items():
                ptr = self._buffers[name].ptr
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self.stream), "copy out")
            _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return [outputs[n] for n in output_names]

    def __del__(self) -> None:
        for buffer in getattr(self, "_buffers", {}).values():
            try:  # noqa: SIM105 - runs at interpreter exit too, where contextlib may be gone
                buffer.free()
            except Exception:  # noqa: BLE001 - the CUDA context may already be gone at interpreter exit
                pass
