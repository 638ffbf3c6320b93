"""Stable Diffusion export on the tiny random-weight folder: the four graphs against PyTorch, the registered
character against the text encoder, the loop on the exported graphs, and the command line's errors."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.ensemble.diffusion import DiffusionOptions, img2img
from isekai.export import common, lora_slots, sd
from isekai.export.characters import add_prompt_character, report_stale, set_default
from isekai.export.common import check_parity, ort_session, random_like
from isekai.export.make_sd import make_sd_folder

ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}
MODELS = (C.TEXT_ENCODER_MODEL, C.UNET_MODEL, C.VAE_ENCODER_MODEL, C.VAE_DECODER_MODEL)


def spec_of(model: str, hidden: int):
    return {
        C.TEXT_ENCODER_MODEL: sd.text_encoder_spec(hidden),
        C.UNET_MODEL: sd.unet_spec(hidden),
        C.VAE_ENCODER_MODEL: sd.vae_encoder_spec(),
        C.VAE_DECODER_MODEL: sd.vae_decoder_spec(),
    }[model]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sd.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("sd") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def models(folder):
    return sd.load_sd(folder)


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    """One export through the command line into a fresh Triton repository."""
    repository = tmp_path_factory.mktemp("repository")
    code = sd.main(parse(["--model", str(folder), "--repository", str(repository)]))
    assert code == 0
    return repository


def graph_path(repository, model):
    return repository / model / C.MODEL_VERSION / C.ONNX_FILENAME


def test_folder_is_the_dreambooth_layout(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    for path in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "scheduler/scheduler_config.json", *(
                     f"tokenizer/{name}" for name in chars.TOKENIZER_FILES)):
        assert (folder / path).is_file(), path
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["skip_prk_steps"] is True


def test_tiny_keeps_sd_shape_rules(models):
    assert len(models.vae.config.block_out_channels) == 4  # VAE factor 8
    assert len(models.unet.config.block_out_channels) == 4  # latent halved 3 times
    assert models.unet.config.cross_attention_dim == models.text_hidden_size
    assert models.text_encoder.config.max_position_embeddings == C.SD_TOKEN_LENGTH
    assert len(models.tokenizer) <= models.text_encoder.config.vocab_size


@pytest.mark.parametrize("model", MODELS)
def test_graph_names_dtypes_and_dynamic_axes(exported, models, model):
    spec = spec_of(model, models.text_hidden_size)
    graph = onnx.load(str(graph_path(exported, spec.model)), load_external_data=False).graph
    slots = {init.name for init in graph.initializer}  # LoRA slots: inputs with a default
    inputs = [i for i in graph.input if i.name not in slots]
    assert [i.name for i in inputs] == spec.input_names
    assert [o.name for o in graph.output] == spec.output_names
    for value, dims in zip([*inputs, *graph.output], [*spec.inputs.values(), *spec.outputs.values()],
                           strict=True):
        shape = value.type.tensor_type.shape.dim
        assert len(shape) == len(dims), value.name
        for got, want in zip(shape, dims, strict=True):
            if isinstance(want, int):
                assert got.dim_value == want, value.name
            else:
                assert got.dim_param, f"{value.name}: axis {want} should be dynamic"
    dtypes = {i.name: ONNX_TYPES[i.type.tensor_type.elem_type] for i in inputs}
    if spec.model == C.TEXT_ENCODER_MODEL:
        assert dtypes[C.TEXT_IN_IDS] == C.TEXT_IDS_DTYPE
    if spec.model == C.UNET_MODEL:
        assert dtypes[C.UNET_IN_TIMESTEP] == C.UNET_TIMESTEP_DTYPE


def parity_cases(models):
    """Inputs at batches and sizes the export did not trace (it traced batch 2, latent 16x24)."""
    d, L = models.text_hidden_size, C.SD_TOKEN_LENGTH
    vocab = models.text_encoder.config.vocab_size
    ids = torch.randint(0, vocab, (3, L), generator=torch.Generator().manual_seed(5))
    return {
        C.TEXT_ENCODER_MODEL: (sd.TextEncoderExport(models.text_encoder), {C.TEXT_IN_IDS: ids.int()}),
        C.UNET_MODEL: (sd.UNetExport(models.unet), {
            C.UNET_IN_SAMPLE: random_like((2, 4, 8, 32), seed=7),
            C.UNET_IN_TIMESTEP: torch.tensor([37.0, 37.0]),
            C.UNET_IN_HIDDEN: random_like((2, L, d), seed=8),
        }),
        C.VAE_ENCODER_MODEL: (
            sd.VaeEncoderExport(models.vae), {C.VAE_ENC_IN_SAMPLE: random_like((3, 3, 40, 96))}
        ),
        C.VAE_DECODER_MODEL: (
            sd.VaeDecoderExport(models.vae), {C.VAE_DEC_IN_LATENT: random_like((2, 4, 5, 12))}
        ),
    }


@pytest.mark.parametrize("model", MODELS)
def test_parity_at_other_batch_and_size(exported, models, model):
    module, inputs = parity_cases(models)[model]
    spec = spec_of(model, models.text_hidden_size)
    path = graph_path(exported, model)
    report = check_parity(module, path, inputs, spec, atol=sd.ATOL[model], rtol=sd.RTOL)
    assert report.worst() <= sd.ATOL[model]


def test_the_exported_unet_runs_one_softmax_per_head(exported, models):
    """Each self-attention block is exported as ``heads`` softmaxes over [B, N, N] scores, not one over
    [B, heads, N, N] (export/sd_attention.py): the buffers the served unet holds shrink by the head count."""
    graph = onnx.load(graph_path(exported, C.UNET_MODEL), load_external_data=False).graph
    softmaxes = sum(node.op_type == "Softmax" for node in graph.node)
    self_blocks = [m for n, m in models.unet.named_modules() if n.endswith("attn1")]
    cross_blocks = [m for n, m in models.unet.named_modules() if n.endswith("attn2")]
    assert self_blocks[0].heads > 1
    assert softmaxes == self_blocks[0].heads * len(self_blocks) + len(cross_blocks)


@pytest.mark.parametrize("model,count", [(C.UNET_MODEL, None), (C.TEXT_ENCODER_MODEL, None)])
def test_unet_and_text_encoder_carry_lora_slots_with_rank_0_defaults(exported, models, model, count):
    path = graph_path(exported, model)
    slots = lora_slots.read_slots(path)
    module = models.unet if model == C.UNET_MODEL else models.text_encoder
    linear_or_conv = [n for n, m in module.named_modules()
                      if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    if model == C.UNET_MODEL:  # the default targets: every Linear and Conv2d
        assert sorted(slots) == sorted(linear_or_conv)
    else:  # the text encoder's transformer layers (the final projection has none)
        assert sorted(slots) == sorted(p for p in linear_or_conv if ".layers." in f".{p}")
    graph = onnx.load(str(path), load_external_data=False).graph
    defaults = {init.name: list(init.dims) for init in graph.initializer if init.name.endswith(".lora_A")}
    assert len(defaults) == len(slots) and all(0 in dims for dims in defaults.values())
    layers, targets = lora_slots.graph_layers(path)
    assert sorted(layers) == sorted(slots) and targets == C.DEFAULT_LORA_TARGETS


def test_export_registers_the_default_character(exported, models, folder):
    data = exported / C.DIFFUSION_MODEL
    assert sorted(p.name for p in (data / chars.TOKENIZER_DIR).iterdir()) == sorted(chars.TOKENIZER_FILES)
    config = chars.PipelineConfig.load(exported)
    assert config.default_character == C.DEFAULT_CHARACTER
    assert config.scaling_factor == models.vae.config.scaling_factor
    assert config.scheduler_config == json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert config.text_hidden_size == models.text_hidden_size
    assert config.fingerprints == sd.fingerprints(folder) and config.base_fingerprint
    assert config.unet_config == sd.architecture(models.unet.config)
    character = chars.CharacterStore(exported).get(None)
    assert character.name == C.DEFAULT_CHARACTER and character.prompt == sd.DEFAULT_PROMPT
    # Row 0 negative, row 1 prompt, as the PyTorch text encoder computes them from the folder's tokenizer.
    want = sd.encode_prompts(models, [sd.DEFAULT_NEGATIVE_PROMPT, sd.DEFAULT_PROMPT])
    np.testing.assert_allclose(character.embeddings, want, rtol=0, atol=sd.ATOL[C.TEXT_ENCODER_MODEL])


def test_prompt_override_path_matches_registered_embeddings(exported, models):
    """What the server does for a request's own prompt: the copied tokenizer, then the text_encoder graph."""
    folder = add_prompt_character(exported, "sks", "a photo of sks girl", "blurry")
    assert folder == exported / C.DIFFUSION_MODEL / chars.CHARACTERS_DIR / "sks"
    tokenizer = chars.Tokenizer.from_repository(exported)
    session = ort_session(graph_path(exported, C.TEXT_ENCODER_MODEL))
    rows = [session.run(None, {C.TEXT_IN_IDS: tokenizer(p)})[0][0] for p in ("blurry", "a photo of sks girl")]
    character = chars.CharacterStore(exported).get("sks")
    atol = sd.ATOL[C.TEXT_ENCODER_MODEL]
    np.testing.assert_allclose(np.stack(rows), character.embeddings, rtol=0, atol=atol)
    assert chars.CharacterStore(exported).config.default_character == C.DEFAULT_CHARACTER  # unchanged


def test_export_with_a_character_makes_it_the_default_and_turns_other_bases_away(exported, tmp_path):
    """Item 5 of the characters issue: after `export sd --model X --character NAME`, requests without a
    character draw NAME with X, and characters registered on the previous base are refused by name, not drawn
    by X."""
    repository = shutil.copytree(exported, tmp_path / "repository")
    add_prompt_character(repository, "villain", "a dark knight")
    stale_before = chars.CharacterStore(repository).names()  # whatever other tests registered
    other = make_sd_folder(tmp_path / "other", "tiny", seed=1)  # same architecture, other weights
    argv = ["--model", str(other), "--repository", str(repository), "--character", "hero", "--prompt",
            "a boy"]
    assert sd.main(parse(argv)) == 0
    store = chars.CharacterStore(repository)
    assert store.config.default_character == "hero" and store.get(None).name == "hero"
    assert store.config.fingerprints == sd.fingerprints(other)
    with pytest.raises(ValueError, match="'villain' was registered on another base model"):
        store.get("villain")
    assert sorted(report_stale(repository)) == sorted({C.DEFAULT_CHARACTER, "villain", *stale_before})
    set_default(repository, "hero")
    with pytest.raises(ValueError, match="another base model"):
        set_default(repository, "villain")


def test_loop_on_exported_graphs_matches_pytorch(exported, models):
    """The diffusion loop fed by the four onnxruntime sessions, as the server will run it."""

    def session_fn(model):
        session = ort_session(graph_path(exported, model))
        return lambda *arrays: session.run(
            None, dict(zip([i.name for i in session.get_inputs()], arrays, strict=False))
        )[0]

    config = chars.PipelineConfig.load(exported)
    character = chars.CharacterStore(exported).get(None)
    image = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    options = DiffusionOptions(steps=6, strength=0.5, guidance=7.5, seed=1)
    common_args = dict(scheduler_config=config.scheduler_config, scaling_factor=config.scaling_factor)
    onnx_models = dict(
        vae_encode=session_fn(C.VAE_ENCODER_MODEL),
        unet=session_fn(C.UNET_MODEL),
        vae_decode=session_fn(C.VAE_DECODER_MODEL),
    )
    torch_models = dict(
        vae_encode=sd.numpy_callable(sd.VaeEncoderExport(models.vae)),
        unet=sd.numpy_callable(sd.UNetExport(models.unet)),
        vae_decode=sd.numpy_callable(sd.VaeDecoderExport(models.vae)),
    )
    got = img2img(image, character.embeddings, options, **onnx_models, **common_args)
    want = img2img(image, character.embeddings, options, **torch_models, **common_args)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_large_graphs_use_external_data(models, tmp_path, monkeypatch):
    """Graphs over protobuf's 2 GB limit (SD 1.5's UNet is 3.4 GB) are written with external data: the same
    code path, forced on the tiny VAE decoder by lowering the threshold."""
    monkeypatch.setattr(common, "EXTERNAL_DATA_THRESHOLD", 0)
    spec = sd.vae_decoder_spec()
    module = sd.VaeDecoderExport(models.vae)
    sample = {C.VAE_DEC_IN_LATENT: random_like((2, 4, 16, 24))}
    path = common.export_onnx(module, spec, sample, tmp_path / "vae_decoder" / C.ONNX_FILENAME)
    data = [p for p in path.parent.iterdir() if p != path]
    assert data and sum(p.stat().st_size for p in data) > path.stat().st_size
    other = {C.VAE_DEC_IN_LATENT: random_like((1, 4, 8, 8))}
    check_parity(module, path, other, spec, atol=sd.ATOL[spec.model])


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys, folder):
    assert sd.main(parse(["--model", str(tmp_path / "missing"), "--repository", str(tmp_path)])) == 2
    assert "model folder" in capsys.readouterr().err
    (tmp_path / "not_sd").mkdir()
    assert sd.main(parse(["--model", str(tmp_path / "not_sd"), "--output", str(tmp_path)])) == 2
    assert "not a diffusers Stable Diffusion folder: model_index.json is missing" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert sd.main(parse(["--model", str(broken), "--output", str(tmp_path)])) == 2
    assert "no unet, vae, text_encoder, tokenizer, scheduler" in capsys.readouterr().err
    argv = ["--model", str(folder), "--repository", str(tmp_path), "--character", "hero"]
    assert sd.main(parse(argv)) == 2
    assert "--character hero needs --prompt" in capsys.readouterr().err
    assert sd.main(parse([*argv[:-1], "../evil", "--prompt", "p"])) == 2
    assert "character name should match" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/1/model.onnx"))  # nothing exported on errors


def test_every_flag_has_help():
    parser = argparse.ArgumentParser()
    sd.add_arguments(parser)
    assert all(action.help for action in parser._actions if action.dest != "help")
