"""DreamBooth-LoRA training on the tiny random-weight SD folder: photos in, the loss falling on a fixed batch,
the LoRA file as diffusers reads it, exact resumes, prior preservation, and the errors bad inputs get."""

from __future__ import annotations

import argparse
import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data

from isekai.export import train_lora as tl
from isekai.export import train_photos as tp
from isekai.export.make_sd import make_sd_folder
from isekai.export.sd import load_sd

PROMPT = "a photo of sks girl"
SIDE = 64  # training side: the smallest the exported UNet takes (C.SD_SIZE_MULTIPLE)
# Few steps, a checkpoint every other one; lr 1e-3 so that 2 steps move the LoRA factors visibly.
FAST = tl.TrainOptions(steps=4, resolution=SIDE, learning_rate=1e-3, checkpoint_every=2, device="cpu")


# one thread also because runs compared bit for bit must use the same thread count
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return make_sd_folder(tmp_path_factory.mktemp("train-sd") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Three crops of scikit-image's astronaut photo (a person), as PNG, JPEG and WebP, none square."""
    astronaut = data.astronaut()  # uint8 [512, 512, 3]
    folder = tmp_path_factory.mktemp("photos")
    for (top, left, height, width), name in zip(
        [(0, 0, 300, 260), (100, 150, 200, 300), (200, 50, 280, 240)],
        ["a.png", "b.jpg", "c.webp"],
        strict=True,
    ):
        Image.fromarray(astronaut[top : top + height, left : left + width]).save(folder / name)
    return folder


def lora_factors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --- options and photos -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prior_preservation": True}, "prior preservation needs a class prompt"),
        ({"prior_preservation": True, "class_prompt": "  "}, "prior preservation needs a class prompt"),
        ({"rank": 0}, "rank should be an integer >= 1 but is 0"),
        ({"resolution": 100}, "resolution should be a positive multiple of 64 but is 100"),
        ({"learning_rate": 0.0}, "learning_rate should be > 0"),
        ({"device": "tpu"}, "device should be one of"),
        ({"mixed_precision": "bf16"}, "mixed_precision should be one of"),
    ],
)
def test_options_refuse_bad_values(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tl.TrainOptions(**changes)


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        tl.resolve_device(tl.TrainOptions(device="cpu", mixed_precision="fp16"))


def test_empty_image_folder_is_refused(tiny_sd, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / ".DS_Store").write_bytes(b"\0")  # hidden files do not count as photos
    with pytest.raises(ValueError, match="holds no photos"):
        tl.train_dreambooth_lora(tiny_sd, tmp_path / "photos", PROMPT, tmp_path / "out", FAST)


def test_non_image_file_is_refused(tiny_sd, photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes((photos / "a.png").read_bytes())
    (folder / "notes.txt").write_text("not a photo")
    with pytest.raises(ValueError, match=r"notes\.txt is not a photo"):
        tl.train_dreambooth_lora(tiny_sd, folder, PROMPT, tmp_path / "out", FAST)


def test_unreadable_photo_is_refused_before_any_model_work(tiny_sd, photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes((photos / "a.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg is not a readable image"):
        tl.train_dreambooth_lora(tiny_sd, folder, PROMPT, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


def test_load_photo_applies_exif_rotation_and_sizes_the_short_side(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # landscape, 40 wide; the left half red
    pixels[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif, quality=95)
    (tmp_path / "rotated.jpg").write_bytes(buffer.getvalue())
    Image.fromarray(pixels).convert("L").save(tmp_path / "gray.png")

    rotated = tp.load_photo(tmp_path / "rotated.jpg", 64)
    assert rotated.dtype == torch.uint8 and rotated.shape == (3, 128, 64)  # portrait after rotation
    assert rotated[0, :56].float().mean() > 200 and rotated[0, -56:].float().mean() < 50  # red on top
    assert tp.load_photo(tmp_path / "gray.png", 64).shape == (3, 64, 128)  # gray becomes RGB


def test_crop_is_centred_without_a_generator_and_seeded_with_one():
    photo = torch.arange(3 * 70 * 90, dtype=torch.int64).reshape(3, 70, 90).remainder(256).to(torch.uint8)
    centre = tp.crop(photo, 64)
    assert centre.shape == (3, 64, 64) and centre.dtype == torch.float32
    torch.testing.assert_close(centre, photo[:, 3:67, 13:77].float() / 127.5 - 1.0)
    first = tp.crop(photo, 64, torch.Generator().manual_seed(5))
    again = tp.crop(photo, 64, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, again)
    assert first.min() >= -1.0 and first.max() <= 1.0


# --- training -----------------------------------------------------------------------------------------------


def test_loss_falls_on_a_fixed_batch(tiny_sd, photos):
    options = tl.TrainOptions(resolution=SIDE, learning_rate=1e-3, augment=False, device="cpu")
    trainer = tl.LoraTrainer(load_sd(tiny_sd), PROMPT, options, tp.load_photos(tp.list_photos(photos), SIDE))
    batch = trainer.draw_batch(0)  # fixed photo, noise and timestep; no crop or flip
    assert batch.pixels.shape == (1, 3, SIDE, SIDE) and batch.noise.shape == (1, 4, SIDE // 8, SIDE // 8)
    losses = [trainer.step(batch).total for _ in range(8)]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.98 * losses[0], losses


def test_steps_draw_seeded_batches(tiny_sd, photos):
    options = tl.TrainOptions(resolution=SIDE, batch_size=2, device="cpu")
    trainer = tl.LoraTrainer(load_sd(tiny_sd), PROMPT, options, tp.load_photos(tp.list_photos(photos), SIDE))
    a, again, b = trainer.draw_batch(3), trainer.draw_batch(3), trainer.draw_batch(4)
    for name in ("pixels", "noise", "timesteps"):
        torch.testing.assert_close(getattr(a, name), getattr(again, name))
    assert not torch.equal(a.noise, b.noise)
    assert a.timesteps.dtype == torch.int64 and int(a.timesteps.min()) >= 0 and int(a.timesteps.max()) < 1000


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet+text-encoder"])
def test_lora_file_loads_in_diffusers(tiny_sd, photos, tmp_path, train_text_encoder):
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 - diffusers is heavy, only when asked

    options = replace(FAST, steps=2, train_text_encoder=train_text_encoder)
    path = tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, tmp_path / "out", options)
    assert path == tmp_path / "out" / tl.LORA_FILENAME

    factors = lora_factors(path)
    unet_keys = [k for k in factors if k.startswith("unet.")]
    text_keys = [k for k in factors if k.startswith("text_encoder.")]
    assert len(unet_keys) + len(text_keys) == len(factors)
    assert all(re.fullmatch(r"unet\..+\.(to_[qkv]|to_out\.0)\.lora\.(down|up)\.weight", k) for k in unet_keys)
    assert bool(text_keys) == train_text_encoder
    assert all(
        re.fullmatch(r"text_encoder\..+_proj\.lora_linear_layer\.(down|up)\.weight", k) for k in text_keys
    )
    down = factors[unet_keys[0].replace(".up.", ".down.")]
    assert down.shape[0] == options.rank and down.dtype == torch.float32

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden_before = pipe.text_encoder(ids)[0]
        noise_before = pipe.unet(sample, 500, encoder_hidden_states=hidden_before).sample
        pipe.load_lora_weights(str(path))
        hidden_after = pipe.text_encoder(ids)[0]
        noise_after = pipe.unet(sample, 500, encoder_hidden_states=hidden_before).sample
        merged = merged_unet(tiny_sd, factors)(sample, 500, encoder_hidden_states=hidden_before).sample
    assert (noise_after - noise_before).abs().max() > 1e-4
    # The file means W + up @ down (scale 1): diffusers' loaded adapter equals the factors merged by hand.
    torch.testing.assert_close(noise_after, merged, atol=1e-5, rtol=1e-4)
    assert ((hidden_after - hidden_before).abs().max() > 1e-5) == train_text_encoder


def merged_unet(folder: Path, factors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The folder's UNet with every ``unet.<module>.lora.{down,up}.weight`` pair added to its weight."""
    from diffusers import UNet2DConditionModel  # noqa: PLC0415 - diffusers is heavy, only when asked

    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
    for key, down in factors.items():
        if key.startswith("unet.") and key.endswith(".lora.down.weight"):
            module = unet.get_submodule(key[len("unet.") : -len(".lora.down.weight")])
            up = factors[key.replace(".lora.down.", ".lora.up.")]
            module.weight.data += up @ down
    return unet.eval()


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_sd, photos, tmp_path):
    options = replace(FAST, batch_size=2)  # random crops and flips: resumed too
    whole = tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, tmp_path / "whole", options)

    halves = tmp_path / "halves"
    tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, halves, replace(options, steps=2))
    assert [step for step, _ in tl.checkpoints(halves)] == [2]
    resumed = tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, halves, options, resume=True)
    assert [step for step, _ in tl.checkpoints(halves)] == [2, 4]

    expected, actual = lora_factors(whole), lora_factors(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # The checkpoints load as plain tensors (weights_only) and match too.
    for name in ("optimizer.pt", "rng.pt"):
        a = torch.load(tmp_path / "whole" / "checkpoint-4" / name, weights_only=True)
        b = torch.load(halves / "checkpoint-4" / name, weights_only=True)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_other_options_and_fresh_runs_refuse_old_output(tiny_sd, photos, tmp_path):
    output = tmp_path / "out"
    tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, output, replace(FAST, steps=2))
    with pytest.raises(ValueError, match=r"rank=4 there, 8 here"):
        tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, output, replace(FAST, rank=8), resume=True)
    with pytest.raises(ValueError, match=r"text_encoder_targets=\[\] there"):
        options = replace(FAST, train_text_encoder=True)
        tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, output, options, resume=True)
    with pytest.raises(ValueError, match=r"past steps=1; ask for >= 2"):
        tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, output, replace(FAST, steps=1), resume=True)
    with pytest.raises(ValueError, match="already holds a training run"):
        tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, output, FAST)


def test_prior_preservation_generates_class_images_once(tiny_sd, photos, tmp_path):
    class_images = tmp_path / "class"
    options = replace(
        FAST,
        steps=2,
        prior_preservation=True,
        class_prompt="a photo of a girl",
        class_images=class_images,
        num_class_images=3,
        class_inference_steps=2,
    )
    tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, tmp_path / "first", options)
    made = tp.list_photos(class_images)
    assert [p.name for p in made] == ["class-0000.png", "class-0001.png", "class-0002.png"]
    for p in made:
        with Image.open(p) as image:
            assert image.size == (SIDE, SIDE)

    stamps = [p.stat().st_mtime_ns for p in made]
    path = tl.train_dreambooth_lora(tiny_sd, photos, PROMPT, tmp_path / "second", options)
    assert [p.stat().st_mtime_ns for p in tp.list_photos(class_images)] == stamps  # reused, not redrawn
    assert path.is_file()

    # Each step's batch: the photo rows, then as many class-image rows; both losses are reported.
    trainer = tl.LoraTrainer(
        load_sd(tiny_sd),
        PROMPT,
        options,
        tp.load_photos(tp.list_photos(photos), SIDE),
        tp.load_photos(made, SIDE),
    )
    batch = trainer.draw_batch(0)
    assert batch.pixels.shape[0] == 2 * options.batch_size
    loss = trainer.step(batch)
    assert loss.prior is not None
    assert loss.total == pytest.approx(loss.instance + options.prior_loss_weight * loss.prior, rel=1e-5)


# --- command line -------------------------------------------------------------------------------------------


def test_command_line_flags_become_options(tmp_path):
    parser = argparse.ArgumentParser()
    tl.add_arguments(parser)
    assert all(action.help for action in parser._actions if action.dest != "help")
    args = parser.parse_args(
        ["--images", "photos", "--base", "sd", "--prompt", PROMPT, "--steps", "10", "--rank", "8",
         "--lr", "5e-5", "--resolution", "256", "--batch-size", "2", "--center-crop", "--prior-preservation",
         "--class-prompt", "a girl", "--class-images", "cls", "--num-class-images", "7",
         "--class-inference-steps", "3", "--prior-loss-weight", "0.5", "--train-text-encoder",
         "--checkpoint-every", "5", "--seed", "9", "--device", "cpu", "--output", str(tmp_path), "--resume"]
    )  # fmt: skip
    assert (args.images, args.base, args.prompt, args.output, args.resume) == (
        Path("photos"), Path("sd"), PROMPT, tmp_path, True
    )  # fmt: skip
    assert tl.options_from_args(args) == tl.TrainOptions(
        steps=10, rank=8, learning_rate=5e-5, resolution=256, batch_size=2, augment=False,
        prior_preservation=True, class_prompt="a girl", class_images=Path("cls"), num_class_images=7,
        class_inference_steps=3, prior_loss_weight=0.5, train_text_encoder=True, checkpoint_every=5, seed=9,
        device="cpu",
    )  # fmt: skip
    defaults = parser.parse_args(["--images", "p", "--base", "b", "--prompt", PROMPT])
    assert tl.options_from_args(defaults) == tl.TrainOptions()
    assert defaults.output == tl.DEFAULT_OUTPUT and not defaults.resume
