"""onnxruntime session options from a model config's ``parameters``, without importing Triton.

The default profile's ONNX models (:mod:`isekai.serving.onnx_model`, inside Triton's Python backend) and the
benchmark's in-process onnxruntime phase (``bench/``) build their sessions here, so both run the graphs alike.

Parameters (``config.pbtxt``: ``parameters { key: "..." value: { string_value: "..." } }``), all optional:

- ``intra_op_threads``: threads of one operator; ``"0"`` (default) means all cores;
- ``cpu_mem_arena``: ``"true"`` (default) keeps onnxruntime's arena of activation buffers between runs. The
  default profile turns it off for the models with big activations (SAM encoder, LaMa, UNet, VAE): the arena holds
  each one's peak buffers for good (vit_h: 11.2 GiB resident after a run instead of 2.9 GiB) for no measurable speed,
  and a server holding them all runs out of memory. bench/ measures it ("Levers").
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def session_options(params: Mapping[str, str]):
    """onnxruntime ``SessionOptions`` for the CPU provider from a config's parameters (see the module docstring)."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = int(params.get("intra_op_threads", "0")) or (os.cpu_count() or 1)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = params.get("cpu_mem_arena", "true") == "true"
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options
