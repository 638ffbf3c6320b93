"""``isekai export sd --lcm-lora``: an LCM-LoRA-shaped random LoRA fused into the tiny model's UNet, the
pipeline on diffusers' LCMScheduler, and parity of the served-path loop (ensemble/diffusion.img2img on the
exported graphs in onnxruntime) with diffusers' own LCM img2img (StableDiffusionImg2ImgPipeline + LCMScheduler
+
load_lora_weights)."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.ensemble.diffusion import DiffusionOptions, img2img, scheduler_class
from isekai.export import adapters, fused_lora, lora_slots, make_lora, sd
from isekai.export.characters import Base, add_full_character, add_lora_character
from isekai.export.common import ort_session, random_like
from isekai.export.demo import DEMO_LCM_LORA, lcm_lora_factors
from isekai.export.make_sd import make_sd_folder
from tests.conftest import CACHE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sd.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def folder(lcm_repository):
    """The demo's tiny SD folder, which the LCM repository was exported from."""
    return CACHE / "checkpoints" / "sd-tiny"


@pytest.fixture(scope="module")
def lcm_lora(lcm_repository):
    """The random LoRA shaped like the published LCM-LoRA (kohya layout with .alpha, as lcm-lora-sdv1-5 ships
    it; rank 8, scale alpha / rank = 0.5) that the repository fused."""
    return CACHE / "checkpoints" / DEMO_LCM_LORA


@pytest.fixture(scope="module")
def lcm_factors(folder):
    return lcm_lora_factors(sd.load_sd(folder).unet)


@pytest.fixture(scope="module")
def exported(lcm_repository, tmp_path_factory):
    """A private copy of the session's LCM repository (tests here register characters)."""
    return shutil.copytree(lcm_repository, tmp_path_factory.mktemp("lcm") / "repository")


def graph_path(repository, model):
    return repository / model / C.MODEL_VERSION / C.ONNX_FILENAME


def session_fn(path, extra=None):
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    return lambda *arrays: session.run(None, {**dict(zip(names, arrays, strict=False)), **(extra or {})})[0]


def served_callables(repository):
    return dict(
        vae_encode=session_fn(graph_path(repository, C.VAE_ENCODER_MODEL)),
        unet=session_fn(graph_path(repository, C.UNET_MODEL)),
        vae_decode=session_fn(graph_path(repository, C.VAE_DECODER_MODEL)),
    )


def smooth_image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (h + w)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def diffusers_lcm_img2img(folder, lora, image, embeddings, options: DiffusionOptions) -> np.ndarray:
    """diffusers' own LCM img2img, as its LCM-LoRA guide runs it: the folder's pipeline, the scheduler swapped
    for LCMScheduler, the LoRA loaded with load_lora_weights (None: the plain base)."""
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(folder),
        local_files_only=True,
        torch_dtype=torch.float32,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    # The latent mean as a 4-channel "image": both start from the same latents (see
    # tests/unit/test_diffusion.py).
    pixels = torch.from_numpy(image.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    emb = torch.from_numpy(embeddings)
    out = pipe(
        image=latents,
        prompt_embeds=emb[1:],
        negative_prompt_embeds=emb[:1],
        strength=options.strength,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance,
        output_type="np",
        generator=torch.Generator().manual_seed(options.seed),
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def test_the_lora_has_the_lcm_lora_layers(lcm_factors):
    """Convs, resnets' time projections, attention, feed-forward, resamplers; not conv_in/conv_out or the time
    embedding (diffusers' train_lcm_distill_lora_sd.py targets)."""
    paths = list(lcm_factors)
    for part in (
        "conv1",
        "conv_shortcut",
        "time_emb_proj",
        "to_q",
        "proj_in",
        "ff.net.2",
        "downsamplers.0.conv",
    ):
        assert any(p.endswith(part) for p in paths), part
    assert not any(p in ("conv_in", "conv_out") or "time_embedding" in p for p in paths)


def test_pipeline_json_records_lcm_and_the_fused_lora(exported, folder, lcm_lora):
    config = chars.PipelineConfig.load(exported)
    assert config.scheduler == C.LCM_SCHEDULER and scheduler_class(config.scheduler) is LCMScheduler
    assert config.sampling_defaults == (C.LCM_STEPS, C.LCM_GUIDANCE) == (4, 1.0)
    # The scheduler config stays the folder's, as diffusers' LCMScheduler.from_config(pipe.scheduler.config)
    # reads it.
    assert config.scheduler_config == json.loads((folder / "scheduler/scheduler_config.json").read_text())
    record = config.fused_lora
    assert record["layout"] == "kohya" and record["purpose"] == "lcm" and record["ranks"] == [8]
    stored = chars.data_dir(exported) / record["file"]
    assert stored.read_bytes() == lcm_lora.read_bytes() and record["sha256"] == fused_lora.fingerprint(
        lcm_lora
    )
    # Another base for characters than the plain export of the same folder.
    parts = sd.fingerprints(folder)
    assert config.base_fingerprint != sd.base_fingerprint(parts)
    assert config.base_fingerprint == sd.base_fingerprint({**parts, "fused_lora": record["sha256"]})
    assert chars.CharacterStore(exported).get(None).name == C.DEFAULT_CHARACTER  # registered on the LCM base
    # The slots stay for characters' LoRAs on top.
    assert len(lora_slots.read_slots(graph_path(exported, C.UNET_MODEL))) > 0


def test_served_loop_matches_diffusers_lcm_img2img_with_the_lora(exported, folder, lcm_lora):
    """Parity of the served path with diffusers' LCM img2img at the exported defaults (4 steps, guidance 1):
    one batch-1 UNet call per step, and the LoRA really changed the drawing."""
    config = chars.PipelineConfig.load(exported)
    embeddings = chars.CharacterStore(exported).get(None).embeddings
    image = smooth_image(64, 128)
    options = DiffusionOptions(seed=3)  # steps and guidance: the scheduler's defaults
    calls = []
    models = served_callables(exported)
    unet = models["unet"]
    models["unet"] = lambda s, t, h: calls.append((s.shape[0], h.shape[0])) or unet(s, t, h)
    ours = img2img(
        image,
        embeddings,
        options,
        **models,
        scheduler_config=config.scheduler_config,
        scaling_factor=config.scaling_factor,
        scheduler_cls=scheduler_class(config.scheduler),
    )
    resolved = options.resolved(config.scheduler)
    assert (resolved.steps, resolved.guidance) == (4, 1.0)
    assert calls == [(1, 1)] * resolved.denoising_steps() == [(1, 1)] * 3  # no guidance pair
    want = diffusers_lcm_img2img(folder, lcm_lora, image, embeddings, resolved)
    diff = np.abs(ours.astype(int) - want.astype(int))
    assert diff.max() <= 2 and (diff > 1).mean() < 0.01, (diff.max(), (diff > 1).mean())
    plain = diffusers_lcm_img2img(folder, None, image, embeddings, resolved)
    assert np.abs(plain.astype(int) - want.astype(int)).mean() > 5 * max(diff.mean(), 0.2)


def test_more_steps_and_guidance_on_request(exported, folder, lcm_lora):
    """Requests may still ask for more steps; guidance > 1 runs the batch-2 guidance pair (as diffusers)."""
    config = chars.PipelineConfig.load(exported)
    embeddings = chars.CharacterStore(exported).get(None).embeddings
    image = smooth_image(64, 64)
    options = DiffusionOptions(steps=8, strength=0.5, guidance=2.0, seed=4)
    batches = []
    models = served_callables(exported)
    unet = models["unet"]
    models["unet"] = lambda s, t, h: batches.append(s.shape[0]) or unet(s, t, h)
    ours = img2img(
        image,
        embeddings,
        options,
        **models,
        scheduler_config=config.scheduler_config,
        scaling_factor=config.scaling_factor,
        scheduler_cls=scheduler_class(config.scheduler),
    )
    assert batches == [2] * 4
    want = diffusers_lcm_img2img(folder, lcm_lora, image, embeddings, options)
    assert np.abs(ours.astype(int) - want.astype(int)).max() <= 2


def test_diffusers_layout_reads_to_the_same_deltas(folder, lcm_factors, lcm_lora, tmp_path):
    """The same LoRA in diffusers' layout (alpha in the header) fuses the same weights as the kohya file."""
    models = sd.load_sd(folder)
    kohya = fused_lora.read_unet_lora(lcm_lora, models.unet, models.text_encoder)
    path = make_lora.write_lora(
        tmp_path / "lcm-diffusers.safetensors", lcm_factors, layout="diffusers", alpha=4.0
    )
    other = fused_lora.read_unet_lora(path, models.unet, models.text_encoder)
    assert other.layout == "diffusers" and sorted(other.unet) == sorted(kohya.unet)
    for name, layer in kohya.unet.items():
        assert other.unet[name].scale == layer.scale == 0.5
        np.testing.assert_array_equal(other.unet[name].down, layer.down)


def test_a_character_lora_stacks_on_the_fused_base(exported, folder, lcm_factors, tmp_path):
    """The served UNet with a character's adapter computes W + dW_lcm + dW_character (PyTorch: both fused)."""
    base = Base.load(exported)
    factors = make_lora.random_factors(make_lora.attention_only(base.slots[C.UNET_MODEL]), rank=4, seed=9)
    lora = make_lora.write_lora(tmp_path / "hero.safetensors", factors, layout="kohya", alpha=2.0)
    add_lora_character(exported, "hero", lora, "a photo of sks boy", replace=True)
    adapter = adapters.read_adapter(
        chars.characters_dir(exported) / "hero" / f"{C.UNET_MODEL}{chars.ADAPTER_SUFFIX}"
    )
    models = sd.load_sd(folder)
    fused_lora.fuse(
        models.unet,
        fused_lora.read_unet_lora(
            chars.data_dir(exported) / base.config.fused_lora["file"], models.unet, models.text_encoder
        ),
    )
    from isekai.export.lora_formats import read_lora  # noqa: PLC0415

    adapters.fuse_into(models.unet, read_lora(lora, base.layers).unet)
    d = models.text_hidden_size
    feed = {
        C.UNET_IN_SAMPLE: random_like((1, 4, 8, 16), seed=1),
        C.UNET_IN_TIMESTEP: torch.tensor([500.0]),
        C.UNET_IN_HIDDEN: random_like((1, C.SD_TOKEN_LENGTH, d), seed=2),
    }
    with torch.no_grad():
        want = sd.UNetExport(models.unet)(*feed.values()).numpy()
    got = ort_session(graph_path(exported, C.UNET_MODEL)).run(
        None, {k: v.numpy() for k, v in feed.items()} | adapter
    )[0]
    np.testing.assert_allclose(got, want, atol=sd.ATOL[C.UNET_MODEL], rtol=0)


def test_a_full_fine_tune_on_an_lcm_repository_gets_the_lora_fused(
    exported, folder, lcm_lora, tmp_path, monkeypatch
):
    """Its own UNet is its weights plus the repository's LCM-LoRA (drawn by the LCM scheduler like the base):
    the UNet add_full_character hands the exporter, checked without paying for an export (test_characters.py
    exports full fine-tunes)."""
    other = make_sd_folder(tmp_path / "rei", "tiny", seed=1)
    for part in ("tokenizer", "vae", "text_encoder"):  # the base's; only its UNet is its own
        shutil.rmtree(other / part)
        shutil.copytree(folder / part, other / part)
    handed = {}

    def fake_export(models, destinations, lora_targets):
        handed.update(unet=models.unet, text_encoder=models.text_encoder)
        for path in destinations.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"graph")

    monkeypatch.setattr(sd, "export_graphs", fake_export)
    add_full_character(exported, "rei", other, "a photo of sks girl", replace=True)
    want = sd.load_sd(other)
    fused_lora.fuse(want.unet, fused_lora.read_unet_lora(lcm_lora, want.unet, want.text_encoder))
    got = handed["unet"].state_dict()
    for name, value in want.unet.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    plain = sd.load_sd(other).unet.state_dict()
    assert any(not torch.equal(plain[n], v) for n, v in got.items())


def test_a_plain_export_drops_the_lcm_scheduler_and_the_stored_lora(exported, folder, tmp_path):
    repository = shutil.copytree(exported, tmp_path / "repository")
    models = sd.load_sd(folder, text_only=True)
    sd.write_pipeline_data(models, repository, C.DEFAULT_LORA_TARGETS, default=C.DEFAULT_CHARACTER)
    config = chars.PipelineConfig.load(repository)
    assert config.scheduler == C.DEFAULT_SCHEDULER and not config.fused_lora
    assert config.sampling_defaults == (C.DEFAULT_STEPS, C.DEFAULT_GUIDANCE)
    assert not (chars.data_dir(repository) / chars.FUSED_LORA_DIR).exists()


def test_cli_hands_the_lcm_lora_to_the_exporter(folder, lcm_lora, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(sd, "export_sd", lambda *args, **kwargs: seen.update(kwargs) or {})
    assert (
        sd.main(parse(["--model", str(folder), "--repository", str(tmp_path), "--lcm-lora", str(lcm_lora)]))
        == 0
    )
    assert seen["lcm_lora"] == lcm_lora


def test_cli_refuses_a_text_encoder_lora_and_a_missing_file(folder, tmp_path, capsys):
    models = sd.load_sd(folder)
    text = make_lora.random_factors(
        make_lora.layer_shapes(models.text_encoder, lora_slots.text_encoder_layers(models.text_encoder)[:2]),
        rank=2,
        seed=1,
    )
    unet = make_lora.random_factors(make_lora.layer_shapes(models.unet, ["conv_in"]), rank=2, seed=1)
    path = make_lora.write_lora(tmp_path / "te.safetensors", unet, text, layout="kohya")
    repository = tmp_path / "repository"
    assert (
        sd.main(parse(["--model", str(folder), "--repository", str(repository), "--lcm-lora", str(path)]))
        == 2
    )
    assert "must adapt the UNet only" in capsys.readouterr().err
    missing = tmp_path / "missing.safetensors"
    assert (
        sd.main(parse(["--model", str(folder), "--repository", str(repository), "--lcm-lora", str(missing)]))
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not list(repository.glob("*/1/model.onnx"))  # nothing exported on errors
