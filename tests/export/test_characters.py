"""Registering characters on the exported tiny base: LoRA layouts against diffusers and PEFT, the adapter on
the exported UNet against diffusers' own LoRA, full fine-tunes, and every bad file refused with the repository
left exactly as it was."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.export import adapters, characters, lora_formats, sd
from isekai.export.common import ort_session, random_like
from isekai.export.lora_slots import fuse_adapter
from isekai.export.make_lora import attention_only, random_factors, write_lora
from tests.conftest import CACHE

RANK = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_folder(demo_repository):
    """The tiny diffusers folder the demo repository was exported from."""
    return CACHE / "checkpoints" / "sd-tiny"


@pytest.fixture()
def repository(demo_repository, tmp_path):
    """A private copy of the demo repository's SD part (configs, graphs, diffusion data) to register into."""
    target = tmp_path / "repository"
    for model in (C.DIFFUSION_MODEL, C.TEXT_ENCODER_MODEL, C.UNET_MODEL):
        shutil.copytree(demo_repository / model, target / model)
    return target


@pytest.fixture(scope="module")
def base(demo_repository):
    return characters.Base.load(demo_repository)


@pytest.fixture(scope="module")
def pipeline(base_folder):
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 - diffusers is heavy, only when asked

    return StableDiffusionPipeline.from_pretrained(str(base_folder), local_files_only=True,
                                                   safety_checker=None)


def tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lora_file(base, tmp_path, layout="diffusers", *, alpha=None, text=True, unet_layers="all", seed=0,
              text_model_prefix=False):
    unet_shapes = (
        base.slots[C.UNET_MODEL] if unet_layers == "all" else attention_only(base.slots[C.UNET_MODEL])
    )
    unet = random_factors(unet_shapes, RANK, seed)
    te = random_factors(base.slots[C.TEXT_ENCODER_MODEL], RANK, seed + 1) if text else {}
    name = "lora" if layout == "peft" else "lora.safetensors"
    return write_lora(tmp_path / layout / name, unet, te, layout=layout, alpha=alpha,
                      text_model_prefix=text_model_prefix), unet, te


# --- layouts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,alpha",
                         [("diffusers", None), ("diffusers", 2.0), ("kohya", None), ("kohya", 8.0),
                                          ("peft", 2.0)])
def test_layouts_read_to_the_same_layers_and_scale(base, tmp_path, layout, alpha):
    path, unet, te = lora_file(base, tmp_path, layout, alpha=alpha, text=layout != "peft",
                               text_model_prefix=True)
    found = lora_formats.read_lora(path, base.layers)
    assert sorted(found.unet) == sorted(unet) and sorted(found.text_encoder) == sorted(te)
    for want, got in ((unet, found.unet), (te, found.text_encoder)):
        for p, (down, up) in want.items():
            np.testing.assert_array_equal(got[p].down, down)
            np.testing.assert_array_equal(got[p].up, up)
            assert got[p].scale == pytest.approx((alpha or RANK) / RANK)


def test_attention_processor_layout(base, tmp_path):
    path, unet, _ = lora_file(base, tmp_path, "diffusers-processors", text=False, unet_layers="attention")
    found = lora_formats.read_lora(path, base.layers)
    assert found.layout == "diffusers attention processors" and sorted(found.unet) == sorted(unet)
    assert any(p.endswith("to_out.0") for p in found.unet)


def fused_unet_weights(lora_layers, base_folder):
    unet = sd.load_sd(base_folder).unet
    adapters.fuse_into(unet, lora_layers)
    return {k: v for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("layout,alpha", [("diffusers", None), ("diffusers", 2.0), ("kohya", 8.0)])
def test_scale_and_fuse_match_diffusers_fuse_lora(base, base_folder, pipeline, tmp_path, layout, alpha):
    """diffusers' load_lora_weights + fuse_lora on the same file gives the weights fuse_into gives."""
    path, _, _ = lora_file(base, tmp_path, layout, alpha=alpha, text=False)
    found = lora_formats.read_lora(path, base.layers)
    ours = fused_unet_weights(found.unet, base_folder)
    pipeline.load_lora_weights(str(path), adapter_name="x")
    pipeline.fuse_lora(lora_scale=1.0, adapter_names=["x"])
    try:
        theirs = pipeline.unet.state_dict()
        for key, value in ours.items():
            # PEFT keeps a fused layer's weights under base_layer.
            module, _, leaf = key.rpartition(".")
            other = theirs.get(f"{module}.base_layer.{leaf}", theirs.get(key))
            torch.testing.assert_close(other, value, atol=1e-6, rtol=1e-5, msg=key)
    finally:
        pipeline.unfuse_lora()
        pipeline.unload_lora_weights()


def test_peft_folder_matches_peft(base, base_folder, tmp_path):
    from peft import (  # noqa: PLC0415 - peft is heavy, only when asked
        LoraConfig,
        inject_adapter_in_model,
        set_peft_model_state_dict,
    )

    path, _, _ = lora_file(base, tmp_path, "peft", alpha=2.0, text=False, unet_layers="attention")
    config = json.loads((path / "adapter_config.json").read_text())
    reference = sd.load_sd(base_folder).unet
    inject_adapter_in_model(LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                       target_modules=config["target_modules"]), reference)
    state = {
        k.removeprefix("base_model.model."): v
        for k, v in load_file(path / "adapter_model.safetensors").items()
    }
    set_peft_model_state_dict(reference, state)
    ours = sd.load_sd(base_folder).unet
    adapters.fuse_into(ours, lora_formats.read_lora(path, base.layers).unet)
    inputs = (random_like((1, 4, 8, 8)), torch.tensor([500.0]), random_like((1, 77, 32), seed=1))
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs).sample, reference(*inputs).sample, atol=1e-5, rtol=1e-4)


# --- the adapter on the exported graphs ---------------------------------------------------------------------
def test_registered_adapter_on_the_exported_unet_matches_diffusers(base, base_folder, pipeline, repository,
                                                                   tmp_path):
    """The served path (the base graph + the character's .onnx_adapter through LoraAdapter/RunOptions) against
    diffusers' UNet with the same LoRA loaded (PEFT layers, not fused)."""
    path, _, _ = lora_file(base, tmp_path, "diffusers", alpha=2.0, text=False)
    folder = characters.add_lora_character(repository, "hero", path, "a photo of sks girl")
    session = ort_session(repository / C.UNET_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME)
    adapter = ort.LoraAdapter()
    adapter.Load(str(folder / f"{C.UNET_MODEL}{chars.ADAPTER_SUFFIX}"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    sample, t, hidden = (
        random_like((2, 4, 16, 8)),
        torch.tensor([981.0, 981.0]),
        random_like((2, 77, 32), seed=1),
    )
    feeds = {C.UNET_IN_SAMPLE: sample.numpy(), C.UNET_IN_TIMESTEP: t.numpy(),
             C.UNET_IN_HIDDEN: hidden.numpy()}
    got = session.run(None, feeds, options)[0]
    plain = session.run(None, feeds)[0]
    pipeline.load_lora_weights(str(path), adapter_name="hero")
    try:
        with torch.no_grad():
            want = pipeline.unet(sample, t, encoder_hidden_states=hidden).sample.numpy()
    finally:
        pipeline.unload_lora_weights()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(plain - want).max() > 100 * np.abs(got - want).max()  # the adapter did change the output


def test_text_encoder_lora_is_in_the_embeddings_and_in_its_adapter(base, base_folder, repository, tmp_path):
    path, _, _ = lora_file(base, tmp_path, "kohya", alpha=2.0, text_model_prefix=True)
    characters.add_lora_character(repository, "hero", path, "a photo of sks girl", "blurry")
    hero = chars.CharacterStore(repository).get("hero")
    assert hero.kind == "lora" and hero.weights == {C.UNET_MODEL: "adapter", C.TEXT_ENCODER_MODEL: "adapter"}
    models = sd.load_sd(base_folder, text_only=True)
    adapters.fuse_into(models.text_encoder, lora_formats.read_lora(path, base.layers).text_encoder)
    want = sd.encode_prompts(models, ["blurry", "a photo of sks girl"])
    np.testing.assert_allclose(hero.embeddings, want, atol=1e-4, rtol=0)
    plain = sd.encode_prompts(sd.load_sd(base_folder, text_only=True), ["blurry", "a photo of sks girl"])
    assert np.abs(plain - want).max() > 1e-2


# --- bad files ----------------------------------------------------------------------------------------------
def _bad_files(base, tmp_path):
    good, unet, _ = lora_file(base, tmp_path, "kohya", text=False)
    cases = {}
    cases["truncated"] = (tmp_path / "truncated.safetensors", "not a readable safetensors file")
    cases["truncated"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["pickle"] = (tmp_path / "lora.bin", "is a PyTorch pickle")
    torch.save({"a": torch.zeros(1)}, cases["pickle"][0])
    cases["sdxl"] = (tmp_path / "sdxl.safetensors", "SDXL")
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 768),
                                                                                             np.float32)},
              str(cases["sdxl"][0]))
    path = next(iter(unet))
    down, up = unet[path]
    cases["other dims"] = (tmp_path / "wide.safetensors", f"layer '{path}': the LoRA maps")
    write_lora(cases["other dims"][0],
               {path: (np.zeros((RANK, down.shape[1] + 8) + down.shape[2:], np.float32), up)}, layout="kohya")
    cases["unknown key"] = (tmp_path / "unknown.safetensors", "unknown key 'model.diffusion_model.x.weight'")
    save_file({"model.diffusion_model.x.weight": np.zeros((2, 2), np.float32)}, str(cases["unknown key"][0]))
    cases["unknown layer"] = (tmp_path / "layer.safetensors", "which the base model does not have")
    save_file({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": np.zeros((4, 8), np.float32)},
              str(cases["unknown layer"][0]))
    cases["half"] = (tmp_path / "half.safetensors", "has no up factor")
    save_file({f"lora_unet_{path.replace('.', '_')}.lora_down.weight": down}, str(cases["half"][0]))
    cases["dora"] = (tmp_path / "dora.safetensors", "DoRA")
    save_file({f"lora_unet_{path.replace('.', '_')}.dora_scale": np.ones((1,), np.float32)},
              str(cases["dora"][0]))
    cases["empty folder"] = (tmp_path / "empty", "without adapter_config.json")
    cases["empty folder"][0].mkdir()
    return cases


CASES = ["truncated", "pickle", "sdxl", "other dims", "unknown key", "unknown layer", "half", "dora",
         "empty folder"]


@pytest.mark.parametrize("case", CASES)
def test_bad_lora_files_are_refused_and_the_repository_is_left_as_it_was(base, repository, tmp_path, case):
    path, message = _bad_files(base, tmp_path)[case]
    before = tree(repository)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        characters.add_lora_character(repository, "bad", path, "a prompt")
    assert tree(repository) == before


def test_cli_reports_bad_files_and_names(repository, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    characters.add_arguments(parser)
    bad = tmp_path / "x.pt"
    torch.save({}, bad)
    before = tree(repository)
    args = ["add", "hero", "--lora", str(bad), "--prompt", "p", "--repository", str(repository)]
    assert characters.main(parser.parse_args(args)) == 2
    assert "is a PyTorch pickle" in capsys.readouterr().err
    args = ["add", "../evil", "--prompt", "p", "--repository", str(repository)]
    assert characters.main(parser.parse_args(args)) == 2
    assert "character name should match" in capsys.readouterr().err
    assert tree(repository) == before


# --- full fine-tunes, list, remove, default -----------------------------------------------------------------
def fine_tune(base_folder, tmp_path, name="fine-tune", change=("unet",)):
    """A copy of the base folder with other weights for the parts in ``change`` (what a full DreamBooth run
    changes), written by diffusers / transformers as a training script would."""
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 - diffusers is heavy, only when asked

    pipe = StableDiffusionPipeline.from_pretrained(str(base_folder), local_files_only=True,
                                                   safety_checker=None)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for part in change:
            for p in getattr(pipe, part).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    target = tmp_path / name
    pipe.save_pretrained(str(target), safe_serialization=True)
    # the base tokenizer files as they are (save_pretrained rewrites them)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(base_folder / "tokenizer" / f, target / "tokenizer" / f)
    return target


def test_full_fine_tune_gets_its_own_graphs(base_folder, repository, tmp_path):
    folder = fine_tune(base_folder, tmp_path, change=("unet", "text_encoder"))
    path = characters.add_full_character(repository, "tuned", folder, "a photo of sks girl")
    character = chars.CharacterStore(repository).get("tuned")
    assert character.kind == "full"
    assert character.weights == {C.UNET_MODEL: "graph", C.TEXT_ENCODER_MODEL: "graph"}
    assert (path / C.UNET_MODEL / C.ONNX_FILENAME).is_file()
    models = sd.load_sd(folder, text_only=True)
    np.testing.assert_allclose(character.embeddings, sd.encode_prompts(models, ["", "a photo of sks girl"]),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("change,message",
                         [(("vae",), "its vae differs"), ((), "has the base model's own UNet")])
def test_full_fine_tunes_the_base_cannot_draw_are_refused(base_folder, repository, tmp_path, change, message):
    folder = fine_tune(base_folder, tmp_path, change=change)
    before = tree(repository)
    with pytest.raises(ValueError, match=message):
        characters.add_full_character(repository, "tuned", folder, "a prompt")
    assert tree(repository) == before


def test_list_remove_and_default(base, repository, tmp_path, capsys):
    path, _, _ = lora_file(base, tmp_path, "kohya")
    parser = argparse.ArgumentParser()
    characters.add_arguments(parser)

    def run(*argv):
        return characters.main(parser.parse_args([*argv, "--repository", str(repository)]))

    assert run("add", "hero", "--lora", str(path), "--prompt", "a photo of sks girl") == 0
    assert run("add", "hero", "--lora", str(path), "--prompt", "again") == 2  # no silent replace
    assert "already registered" in capsys.readouterr().err
    assert run("add", "hero", "--lora", str(path), "--prompt", "again", "--replace") == 0
    capsys.readouterr()
    assert run("list", "--json") == 0
    listed = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert listed["hero"]["kind"] == "lora" and listed["hero"]["prompt"] == "again"
    assert listed["hero"]["bytes"] > 0 and listed[C.DEFAULT_CHARACTER]["default"]
    assert run("default", "hero") == 0 and chars.PipelineConfig.load(repository).default_character == "hero"
    assert run("remove", "hero") == 2  # the default
    assert "is the default character" in capsys.readouterr().err
    assert run("default", C.DEFAULT_CHARACTER) == 0 and run("remove", "hero") == 0
    assert "hero" not in chars.CharacterStore(repository).names()
    assert run("list") == 0 and "lora-demo" in capsys.readouterr().out


def test_every_flag_has_help():
    parser = argparse.ArgumentParser()
    characters.add_arguments(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert all(action.help for action in p._actions if action.dest != "help"), name


# --- fused plans (the tensorrt profile): the graph transform, checked on the CPU ----------------------------
@pytest.mark.parametrize("model", [C.UNET_MODEL, C.TEXT_ENCODER_MODEL])
def test_an_adapter_fused_into_the_base_graph_runs_what_the_adapter_runs(base, repository, tmp_path, model):
    """What `isekai export tensorrt` builds a LoRA character's plan from: the base graph with the adapter
    fused into its weights and the slots removed, against the slotted graph with the adapter as inputs."""
    path, _, _ = lora_file(base, tmp_path, "kohya", alpha=2.0)
    folder = characters.add_lora_character(repository, "hero", path, "a photo of sks girl")
    params = adapters.read_adapter(folder / f"{model}{chars.ADAPTER_SUFFIX}")
    source = repository / model / C.MODEL_VERSION / C.ONNX_FILENAME
    for name, adapter in (("fused", params), ("plain", None)):
        onnx.save(fuse_adapter(onnx.load(str(source)), adapter), str(tmp_path / f"{name}.onnx"))
    slotted, fused, plain = (ort_session(p)
                             for p in (source, tmp_path / "fused.onnx", tmp_path / "plain.onnx"))
    assert not [i for i in onnx.load(str(tmp_path / "fused.onnx")).graph.input if i.name.endswith(".lora_A")]
    if model == C.UNET_MODEL:
        feeds = {C.UNET_IN_SAMPLE: random_like((2, 4, 8, 16)).numpy(),
                 C.UNET_IN_TIMESTEP: np.array([9.0, 900.0], np.float32),
                 C.UNET_IN_HIDDEN: random_like((2, 77, 32), seed=1).numpy()}
    else:
        feeds = {C.TEXT_IN_IDS: np.arange(2 * 77, dtype=np.int32).reshape(2, 77) % 300}
    want = slotted.run(None, {**feeds, **params})[0]
    np.testing.assert_allclose(fused.run(None, feeds)[0], want, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(plain.run(None, feeds)[0], slotted.run(None, feeds)[0], atol=1e-5, rtol=1e-4)
