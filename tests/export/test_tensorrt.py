"""TensorRT plans: optimization profiles from a GraphSpec (no GPU needed), the clear error without TensorRT,
and, on a machine with an NVIDIA GPU and the tensorrt package, a real fp16 build of a tiny graph."""

from __future__ import annotations

import argparse
import importlib.util
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.export import tensorrt as trt_export
from isekai.export.adapters import read_adapter
from isekai.export.characters import Base, add_lora_character
from isekai.export.common import GraphSpec, export_onnx, ort_session, random_like
from isekai.export.make_lora import random_factors, write_lora
from isekai.export.sam import SAM_DECODER_SPEC, SAM_ENCODER_SPEC, SAM_MAX_PROMPT_POINTS
from isekai.export.tensorrt import build_plan, graph_specs, parse_opt, profile_shapes, spec_for_graph
from isekai.serving.trt_session import TrtSession

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

# An image-like graph: batch B in 1..8, height and width multiples of 8 within 60..1030.
IMAGE_SPEC = GraphSpec(
    model="toy",
    inputs={"image": ("B", 3, "H/8", "W/8"), "scale": ("B",)},
    outputs={"out": ("B", 3, "H/8", "W/8")},
    bounds={"B": (1, 8), "H": (60, 1030), "W": (60, 1030)},
)


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    trt_export.add_arguments(parser)
    return trt_export.main(parser.parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------------------
# Profiles: pure Python.
# ---------------------------------------------------------------------------------------------------------
def test_sam_decoder_profile_spans_the_prompt_points_and_fixes_the_rest():
    shapes = profile_shapes(SAM_DECODER_SPEC)
    assert set(shapes) == set(SAM_DECODER_SPEC.input_names)
    n_max = SAM_MAX_PROMPT_POINTS
    assert shapes[C.SAM_DEC_IN_POINT_COORDS] == ((1, 1, 2), (1, 2, 2), (1, n_max, 2))
    assert shapes[C.SAM_DEC_IN_POINT_LABELS] == ((1, 1), (1, 2), (1, n_max))
    for name in (C.SAM_DEC_IN_EMBEDDINGS, C.SAM_DEC_IN_MASK_INPUT, C.SAM_DEC_IN_ORIG_IM_SIZE):
        fixed = SAM_DECODER_SPEC.inputs[name]
        assert shapes[name] == (fixed, fixed, fixed)


def test_static_graph_profile_is_its_one_shape():
    image = SAM_ENCODER_SPEC.inputs[C.SAM_ENC_IN_IMAGE]
    assert profile_shapes(SAM_ENCODER_SPEC) == {C.SAM_ENC_IN_IMAGE: (image, image, image)}


def test_multiples_round_bounds_inwards_and_axes_are_shared_between_inputs():
    shapes = profile_shapes(IMAGE_SPEC)
    # 60 rounds up to 64, 1030 down to 1024; B tuned at its typical 2; H, W at their lowest.
    assert shapes["image"] == ((1, 3, 64, 64), (2, 3, 64, 64), (8, 3, 1024, 1024))
    assert shapes["scale"] == ((1,), (2,), (8,))
    tuned = profile_shapes(IMAGE_SPEC, {"H": 512, "W": 768, "B": 1})
    assert tuned["image"][1] == (1, 3, 512, 768)
    assert tuned["scale"][1] == (1,)


def test_unbounded_axis_gets_the_export_default_range():
    spec = GraphSpec(model="free", inputs={"x": ("L", 4)}, outputs={"y": ("L", 4)})
    assert profile_shapes(spec) == {"x": ((1, 4), (1, 4), (4096, 4))}


@pytest.mark.parametrize(
    ("opt", "message"),
    [
        ({"H": 500}, "opt H=500 is not allowed; H/8 takes multiples of 8 in 64..1024"),
        ({"H": 2048}, "opt H=2048 is not allowed"),
        ({"Q": 3}, "opt names axes ['Q'] that no input has; its axes are ['B', 'H', 'W']"),
    ],
)
def test_bad_opt_sizes_are_refused_with_the_allowed_range(opt, message):
    with pytest.raises(ValueError, match="toy: " + message.replace("[", r"\[").replace("]", r"\]")):
        profile_shapes(IMAGE_SPEC, opt)


def test_empty_bounds_are_refused():
    spec = GraphSpec(model="bad", inputs={"x": ("H/64",)}, outputs={"y": ("H/64",)}, bounds={"H": (65, 100)})
    with pytest.raises(ValueError, match="axis 'H/64' has no allowed value in bounds 65..100"):
        profile_shapes(spec)


def test_parse_opt():
    assert parse_opt(["N=2", "H=512"]) == {"N": 2, "H": 512}
    for bad in ("N", "N=", "=3", "N=two", "N=-1"):
        with pytest.raises(ValueError, match="is not AXIS=INTEGER"):
            parse_opt([bad])


def test_specs_are_found_by_model_name():
    specs = graph_specs()
    assert specs[C.SAM_ENCODER_MODEL] is SAM_ENCODER_SPEC
    assert specs[C.SAM_DECODER_MODEL] is SAM_DECODER_SPEC


def _identity_graph(path, dims) -> None:
    """An ONNX file whose one input ``x`` has ``dims`` (str: named dynamic axis, int: fixed)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))


def test_fixed_dims_come_from_the_graph_and_named_axes_must_stay_dynamic(tmp_path):
    # A spec factory called with a placeholder width (1) gets the graph's real width (16).
    spec = GraphSpec(model="m", inputs={"x": ("B", 1)}, outputs={"y": ("B", 1)}, bounds={"B": (1, 4)})
    _identity_graph(tmp_path / "ok.onnx", ["batch", 16])
    assert spec_for_graph(spec, tmp_path / "ok.onnx").inputs == {"x": ("B", 16)}
    _identity_graph(tmp_path / "fixed.onnx", [3, 16])
    with pytest.raises(ValueError, match="input x fixes axis 'B' to 3"):
        spec_for_graph(spec, tmp_path / "fixed.onnx")
    _identity_graph(tmp_path / "rank.onnx", ["batch", 16, 2])
    with pytest.raises(ValueError, match="input x has rank 3"):
        spec_for_graph(spec, tmp_path / "rank.onnx")


# ---------------------------------------------------------------------------------------------------------
# The command line without TensorRT.
# ---------------------------------------------------------------------------------------------------------
def test_empty_repository_is_a_clear_error(tmp_path, capsys):
    assert _run_cli("--repository", str(tmp_path)) == 2
    assert "no exported graphs" in capsys.readouterr().err


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-TensorRT message cannot show")
def test_missing_tensorrt_is_a_clear_error(tmp_path, capsys):
    code = _run_cli("--repository", str(tmp_path), "--models", C.SAM_DECODER_MODEL)
    err = capsys.readouterr().err
    assert code == 2
    assert "TensorRT builds need an NVIDIA GPU and the tensorrt package, e.g. inside the NGC Triton" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# A real build (GPU machines with the tensorrt package, e.g. the NGC Triton container).
# ---------------------------------------------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    """x [B, 16] -> y [B, 8]: two layers, enough to give TensorRT something to fuse and run in fp16."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


TINY_SPEC = GraphSpec(model="tiny", inputs={"x": ("B", 16)}, outputs={"y": ("B", 8)}, bounds={"B": (1, 8)})


def _run_plan(plan_path, x: torch.Tensor) -> torch.Tensor:
    """Run a plan once on the GPU with TensorRT's runtime (named-tensor API, TensorRT 8.5+)."""
    import tensorrt as trt  # noqa: PLC0415

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    x = x.cuda().contiguous()
    context.set_input_shape("x", tuple(x.shape))
    y = torch.empty(tuple(context.get_tensor_shape("y")), device="cuda", dtype=torch.float32)
    context.set_tensor_address("x", x.data_ptr())
    context.set_tensor_address("y", y.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return y.cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package (NGC Triton container)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_fp16_plan_of_a_tiny_graph_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    module = _Tiny().eval()
    onnx_path = export_onnx(module, TINY_SPEC, {"x": torch.randn(2, 16)}, tmp_path / "tiny.onnx")
    plan = build_plan(onnx_path, tmp_path / "tiny.plan", TINY_SPEC, profile_shapes(TINY_SPEC), fp16=True)
    for batch in (1, 5, 8):  # inside the profile, away from its opt of 2
        x = torch.randn(batch, 16)
        with torch.no_grad():
            want = module(x).numpy()
        got = _run_plan(plan, x).numpy()
        # fp16 keeps ~3 significant digits; values here are of order 1.
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package (NGC Triton container)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_character_plans_run_what_onnxruntime_runs(demo_repository, tmp_path):
    """The tensorrt profile's characters: a LoRA character's plan (its adapter fused in) through TrtSession,
    the host the tensorrt profile's unet runs, against the base graph with the adapter on onnxruntime."""
    repository = tmp_path / "repository"
    for model in (C.DIFFUSION_MODEL, C.TEXT_ENCODER_MODEL, C.UNET_MODEL):
        shutil.copytree(demo_repository / model, repository / model)
    base = Base.load(repository)
    lora = write_lora(tmp_path / "lora.safetensors", random_factors(base.slots[C.UNET_MODEL], 4, seed=1),
                      layout="kohya")
    folder = add_lora_character(repository, "hero", lora, "a photo of sks girl")
    assert _run_cli("--repository", str(repository), "--models", C.UNET_MODEL, "--fp32") == 0
    plan = chars.plan_path(folder, C.UNET_MODEL)
    assert plan.is_file() and (repository / C.UNET_MODEL / C.MODEL_VERSION / C.PLAN_FILENAME).is_file()
    feeds = {C.UNET_IN_SAMPLE: random_like((2, 4, 16, 16)).numpy(),
             C.UNET_IN_TIMESTEP: np.array([500.0, 500.0], np.float32),
             C.UNET_IN_HIDDEN: random_like((2, 77, 32), seed=1).numpy()}
    params = read_adapter(folder / f"{C.UNET_MODEL}{chars.ADAPTER_SUFFIX}")
    want = ort_session(repository / C.UNET_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME).run(
        None, {**feeds, **params}
    )
    got = TrtSession(plan).run([C.UNET_OUT_SAMPLE], feeds)
    np.testing.assert_allclose(got[0], want[0], atol=1e-3, rtol=1e-3)
