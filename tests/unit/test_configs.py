"""Every config.pbtxt against the public API, the ensemble wiring, the other profiles, and the ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from isekai import constants as C
from isekai.client import api

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
TYPE_NAMES = {v: k.removeprefix("TYPE_") for k, v in mc.DataType.items()}


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def configs() -> dict[str, mc.ModelConfig]:
    return {p.parent.name: parse(p) for p in sorted(REPOSITORY.glob("*/config.pbtxt"))}


def io(tensors) -> dict[str, tuple[str, list[int], bool]]:
    return {
        t.name: (TYPE_NAMES[t.data_type].replace("STRING", "BYTES"), list(t.dims),
                 getattr(t, "optional", False))
        for t in tensors
    }


def test_every_model_folder_has_a_config_named_after_it():
    for name, config in configs().items():
        assert config.name == name
        assert (REPOSITORY / name / C.MODEL_VERSION).is_dir(), f"{name} has no version folder"


@pytest.mark.parametrize(
    "model,inputs,optional,outputs",
    [
        (api.SWAP_MODEL, api.SWAP_INPUTS, api.SWAP_OPTIONAL, api.SWAP_OUTPUTS),
        (api.SEGMENT_MODEL, api.SEGMENT_INPUTS, api.SEGMENT_OPTIONAL, api.SEGMENT_OUTPUTS),
        (api.STREAM_MODEL, api.STREAM_INPUTS, api.STREAM_OPTIONAL, api.STREAM_OUTPUTS),
    ],
)
def test_public_models_match_client_api(model, inputs, optional, outputs):
    config = configs()[model]
    assert config.max_batch_size == 0
    # Every public input is declared optional: Triton 2.51 only counts a request's inputs, so a missing
    # required one reached the ensemble and failed as "unexpected deadlock"; preprocess names it instead. The
    # API's required inputs are the rest of ``inputs``.
    assert set(optional) < set(inputs)
    want_in = {n: (api.DTYPES[n], api.DIMS[n], True) for n in inputs}
    want_out = {n: (api.DTYPES[n], api.DIMS[n], False) for n in outputs}
    assert io(config.input) == want_in
    assert io(config.output) == want_out


@pytest.mark.parametrize("model", [api.SWAP_MODEL, api.SEGMENT_MODEL])
def test_ensemble_steps_are_wired_to_real_tensors(model):
    all_configs = configs()
    ensemble = all_configs[model]
    available = {t.name for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        callee = all_configs[step.model_name]
        callee_in, callee_out = {t.name: t for t in callee.input}, {t.name for t in callee.output}
        for key, value in step.input_map.items():
            assert key in callee_in, f"{model}: {step.model_name} has no input {key}"
            assert value in available, (
                f"{model}: {step.model_name}.{key} reads {value} before anything wrote it"
            )
        missing = [n for n, t in callee_in.items() if not t.optional and n not in step.input_map]
        assert not missing, f"{model}: {step.model_name} required inputs not mapped: {missing}"
        for key, value in step.output_map.items():
            assert key in callee_out, f"{model}: {step.model_name} has no output {key}"
            available.add(value)
    assert {t.name for t in ensemble.output} <= available


@pytest.mark.parametrize("model", C.ONNX_MODELS)
@pytest.mark.parametrize("profile", ["gpu", "tensorrt"])
def test_profiles_serve_the_same_tensors(model, profile):
    default = configs()[model]
    other = parse(REPOSITORY / model / "configs" / f"{profile}.pbtxt")
    assert other.name == default.name and other.max_batch_size == default.max_batch_size
    assert io(other.input) == io(default.input) and io(other.output) == io(default.output)
    assert other.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    params = {k: v.string_value for k, v in other.parameters.items()}
    if model in CHARACTER_MODELS:  # per-request character weights: only a Python model can pick them
        assert other.backend == "python"
        want = {"gpu": ("execution_provider", "cuda"), "tensorrt": ("runtime", "tensorrt")}[profile]
        assert params.get(want[0]) == want[1]
        assert (REPOSITORY / model / C.MODEL_VERSION / "model.py").is_file()
    else:
        assert other.platform in ("onnxruntime_onnx", "tensorrt_plan")


ONNX_TYPES = {1: "FP32", 6: "INT32", 7: "INT64", 10: "FP16", 9: "BOOL"}
CHARACTER_MODELS = (C.UNET_MODEL, C.TEXT_ENCODER_MODEL)


@pytest.mark.parametrize("model", C.ONNX_MODELS)
def test_config_matches_exported_onnx_graph(model, demo_repository):
    """Names, dtypes and dims of each config against the ONNX graph it serves (batch dim and reshape
    included)."""
    config = configs()[model]
    graph = onnx.load(
        str(demo_repository / model / C.MODEL_VERSION / C.ONNX_FILENAME), load_external_data=False
    ).graph

    def onnx_io(values) -> dict[str, tuple[str, list[int]]]:
        out = {}
        for v in values:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            out[v.name] = (ONNX_TYPES[v.type.tensor_type.elem_type], dims)
        return out

    def config_io(tensors) -> dict[str, tuple[str, list[int]]]:
        out = {}
        for t in tensors:
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            if config.max_batch_size > 0:
                dims = [-1, *dims]
            out[t.name] = (TYPE_NAMES[t.data_type], dims)
        return out

    # LoRA slots are graph inputs with a default (an initializer): only adapters set them, never a request.
    defaults = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in defaults]
    got_in, want_in = config_io(config.input), onnx_io(inputs)
    if model in CHARACTER_MODELS:  # the character input picks the weights; the graph never sees it
        assert got_in.pop(C.SD_IN_CHARACTER) == ("STRING", [-1, 1])
    got_out, want_out = config_io(config.output), onnx_io(graph.output)
    assert got_in.keys() == want_in.keys() and got_out.keys() == want_out.keys()
    for got, want in ((got_in, want_in), (got_out, want_out)):
        for name in want:
            (gt, gd), (wt, wd) = got[name], want[name]
            assert gt == wt, f"{model}.{name}: config {gt}, graph {wt}"
            assert len(gd) == len(wd), f"{model}.{name}: config dims {gd}, graph {wd}"
            for g, w in zip(gd, wd, strict=True):
                # A fixed graph dim must match the config, except -1 in the config: widths such as the text
                # encoder's hidden size (768 for SD 1.x, 1024 for SD 2.x) depend on the user's checkpoint.
                assert w == -1 or g in (w, -1), f"{model}.{name}: config dims {gd}, graph {wd}"


# -- optional graphs (upscale): a Python adapter in every profile, so a repository without the graph ------
# still starts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", C.OPTIONAL_ONNX_MODELS)
@pytest.mark.parametrize("profile", ["gpu", "tensorrt"])
def test_optional_graphs_serve_the_same_tensors_in_every_profile(model, profile):
    default = configs()[model]
    other = parse(REPOSITORY / model / "configs" / f"{profile}.pbtxt")
    assert other.name == default.name and other.max_batch_size == default.max_batch_size
    assert io(other.input) == io(default.input) and io(other.output) == io(default.output)
    assert default.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert other.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    # Triton's onnxruntime backend fails to load without model.onnx, and a failed load stops the server.
    assert default.backend == other.backend == "python" and not other.platform
    assert {k: v.string_value for k, v in other.parameters.items()}.get("execution_provider") == "cuda"
    adapter = (REPOSITORY / model / C.MODEL_VERSION / "model.py").read_text()
    assert "from isekai.serving.optional_onnx_model import TritonPythonModel" in adapter
    assert model not in C.ONNX_MODELS, "no TensorRT plan is built for an optional graph"


@pytest.mark.parametrize("model", C.OPTIONAL_ONNX_MODELS)
def test_optional_graph_config_matches_exported_onnx_graph(model, demo_repository):
    """The demo exports every optional graph too: names, dtypes and dims of the config against it."""
    graph = onnx.load(
        str(demo_repository / model / C.MODEL_VERSION / C.ONNX_FILENAME), load_external_data=False
    ).graph
    config = configs()[model]
    assert config.max_batch_size == 0

    def onnx_io(values) -> dict[str, tuple[str, list[int]]]:
        return {v.name: (ONNX_TYPES[v.type.tensor_type.elem_type],
                         [d.dim_value if d.HasField("dim_value") else -1
                          for d in v.type.tensor_type.shape.dim])
                for v in values}

    def config_io(tensors) -> dict[str, tuple[str, list[int]]]:
        return {t.name: (TYPE_NAMES[t.data_type], list(t.dims)) for t in tensors}

    assert config_io(config.input) == onnx_io(graph.input)
    assert config_io(config.output) == onnx_io(graph.output)


def test_upscale_graph_tensor_names_are_the_constants():
    config = configs()[C.UPSCALE_MODEL]
    assert [t.name for t in config.input] == [C.ESRGAN_IN_IMAGE]
    assert [t.name for t in config.output] == [C.ESRGAN_OUT_UPSCALED]
    finish = configs()[C.FINISH_MODEL]
    assert {t.name for t in finish.input} == {"scene", api.UPSCALE, api.FORMAT}
    assert [t.name for t in finish.output] == [api.RESULT]


def test_stream_model_takes_exactly_the_swap_inputs_and_is_decoupled():
    """isekai_stream is isekai's decoupled twin: the same inputs (names, types, dims, optional, order), so an
    input added to isekai (upscale, ...) cannot be forgotten in the stream; its own outputs plus isekai's."""
    all_configs = configs()
    stream, swap = all_configs[api.STREAM_MODEL], all_configs[api.SWAP_MODEL]
    assert list(stream.input) == list(swap.input)
    assert stream.model_transaction_policy.decoupled
    assert stream.backend == "python" and stream.max_batch_size == 0
    assert io(stream.output) == {**io(swap.output), **{n: (api.DTYPES[n], api.DIMS[n], False)
                                                       for n in (api.STAGE, api.PROGRESS, api.PREVIEW)}}
    params = {k: v.string_value for k, v in stream.parameters.items()}
    assert params["ensemble"] == api.SWAP_MODEL
    assert int(params["max_concurrent_swaps"]) == C.STREAM_MAX_CONCURRENT
    assert int(params["max_waiting_swaps"]) == C.STREAM_MAX_WAITING
    assert (REPOSITORY / api.STREAM_MODEL / C.MODEL_VERSION / "model.py").is_file()
