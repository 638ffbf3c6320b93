"""This machine's matmul peak and the UNet's FLOPs per denoising step, for the FLOP/s-vs-peak ratio."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: thread pool, page faults, packed weights
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_peak_gflops(size: int = 4096, repeats: int = 4) -> dict[str, float]:
    """Best float32 GFLOP/s of ``size``-square matmuls on all cores, per library: onnxruntime's MatMul (MLAS,
    what the served graphs run on), torch (its BLAS), numpy (its BLAS). The machine's peak is the best of
    them: on AMD CPUs MKL (torch) takes its AVX2 path while MLAS uses AVX-512, about 2x apart."""
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    threads = os.cpu_count() or 1
    flop = 2.0 * size**3
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    b = np.random.default_rng(1).random((size, size), dtype=np.float32)
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return {
        "onnxruntime": flop / _best_seconds(lambda: session.run(None, {"a": a, "b": b}), repeats) / 1e9,
        "torch": flop / _best_seconds(lambda: ta @ tb, repeats) / 1e9,
        "numpy": flop / _best_seconds(lambda: a @ b, repeats) / 1e9,
    }


def unet_step_flops(sd_folder: Path, latent: tuple[int, int], batch: int = 2) -> int:
    """FLOPs (multiply-adds x2 of convolutions and matmuls, torch's FlopCounterMode) of one UNet call.

    ``batch`` 2 is one classifier-free-guidance step; ``latent`` is (h, w) in latent cells. The UNet is built
    on the meta device from the folder's config, so counting costs no memory and no compute.
    """
    import torch  # noqa: PLC0415
    from diffusers import UNet2DConditionModel  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    config = json.loads((Path(sd_folder) / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).eval()
        sample = torch.empty(batch, unet.config.in_channels, *latent)
        timestep = torch.empty(batch)
        hidden = torch.empty(batch, 77, unet.config.cross_attention_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, timestep, hidden)
    return int(counter.get_total_flops())
