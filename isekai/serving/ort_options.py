"""onnxruntime session options from a model config's ``parameters``, without importing Triton.

The default profile's ONNX models (:mod:`isekai.serving.onnx_model`, inside Triton's Python backend) and the
benchmark's in-process onnxruntime phase (``bench/``) build their sessions here, so both run the graphs alike.

Parameters (``config.pbtxt``: ``parameters { key: "..." value: { string_value: "..." } }``), all optional:

- ``intra_op_threads``: threads of one operator; ``"0"`` (default) means all cores;
- ``execution_provider``: ``"cpu"`` (default) or ``"cuda"`` (onnxruntime-gpu's CUDA provider on the instance's
  GPU, the ``gpu`` profile's models that take characters' adapters, which Triton's own onnxruntime backend
  cannot apply);
- ``cpu_mem_arena``: ``"true"`` (default) keeps onnxruntime's arena of activation buffers between runs. The
  default profile turns it off for the models with big activations (SAM encoder, LaMa, UNet, VAE): the arena
  holds each one's peak buffers for good (vit_h: 11.2 GiB resident after a run instead of 2.9 GiB) for no
  measurable speed, and a server holding them all runs out of memory. bench/ measures it ("Levers").
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def session_options(params: Mapping[str, str]):
    """onnxruntime ``SessionOptions`` for the CPU provider from a config's parameters (see the module
    docstring)."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = int(params.get("intra_op_threads", "0")) or (os.cpu_count() or 1)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = params.get("cpu_mem_arena", "true") == "true"
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Warnings would name every LoRA slot ("initializer appears in graph inputs"): that is the slots' design.
    options.log_severity_level = 3
    return options


def providers(params: Mapping[str, str], device_id: int = 0) -> list:
    """onnxruntime execution providers for ``execution_provider`` (see the module docstring)."""
    name = params.get("execution_provider", "cpu").lower()
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    raise ValueError(f"execution_provider should be cpu or cuda but is {name!r}")
