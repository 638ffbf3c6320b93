"""The img2img loop: against diffusers' img2img pipeline on the tiny model, determinism, checks, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline

from isekai import constants as C
from isekai.ensemble.diffusion import DiffusionOptions, check_inputs, img2img, scheduler_class, sd_input_size
from isekai.export import sd
from isekai.export.make_sd import SD15_SCHEDULER, make_sd_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_sd_folder(tmp_path_factory.mktemp("sd") / "tiny", "tiny", seed=0)
    return sd.load_sd(folder)


@pytest.fixture(scope="module")
def callables(tiny):
    return dict(
        vae_encode=sd.numpy_callable(sd.VaeEncoderExport(tiny.vae)),
        unet=sd.numpy_callable(sd.UNetExport(tiny.unet)),
        vae_decode=sd.numpy_callable(sd.VaeDecoderExport(tiny.vae)),
        scheduler_config=tiny.scheduler_config,
        scaling_factor=tiny.scaling_factor,
    )


@pytest.fixture(scope="module")
def embeddings(tiny):
    return sd.encode_prompts(tiny, ["lowres, blurry", "a photo of sks girl, anime style"])


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A uint8 [h, w, 3] image with some structure (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (h + w)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("scheduler_cls", "guidance"), [
    (DPMSolverMultistepScheduler, 7.5), (PNDMScheduler, 7.5), (DPMSolverMultistepScheduler, 1.0),
    # LCM draws noise between steps from the request's generator, as diffusers' pipeline does.
    (LCMScheduler, 1.0), (LCMScheduler, 2.0),
])
def test_matches_diffusers_img2img_pipeline(tiny, callables, embeddings, scheduler_cls, guidance):
    image = smooth_image(64, 128)
    options = DiffusionOptions(steps=10, strength=0.6, guidance=guidance, seed=3)
    ours = img2img(image, embeddings, options, scheduler_cls=scheduler_cls, **callables)

    # The pipeline samples the VAE posterior; handing it the latent mean (scaled) as a 4-channel "image" makes
    # both start from the same latents, and its first generator draw is then the same noise as ours.
    pipe = StableDiffusionImg2ImgPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=scheduler_cls.from_config(tiny.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.from_numpy(image.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = tiny.vae.encode(pixels).latent_dist.mean * tiny.vae.config.scaling_factor
    emb = torch.from_numpy(embeddings)
    want = pipe(
        image=latents, prompt_embeds=emb[1:], negative_prompt_embeds=emb[:1], strength=options.strength,
        num_inference_steps=options.steps, guidance_scale=options.guidance, output_type="np",
        generator=torch.Generator().manual_seed(options.seed),
    ).images[0]
    want = (want * 255).round().astype(np.uint8)
    assert ours.shape == want.shape == (64, 128, 3) and ours.dtype == np.uint8
    # Same arithmetic in the same order; only the uint8 rounding of values within float32 noise can flip.
    diff = np.abs(ours.astype(int) - want.astype(int))
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01
    # The loop really changed the image (strength 0.6 on random weights).
    assert np.abs(ours.astype(int) - image.astype(int)).mean() > 5


def test_same_seed_same_image_other_seed_differs(callables, embeddings):
    image = smooth_image(64, 64, seed=1)
    options = DiffusionOptions(steps=4, strength=0.5, guidance=5.0, seed=11)
    first = img2img(image, embeddings, options, **callables)
    again = img2img(image, embeddings, options, **callables)
    other = img2img(image, embeddings, DiffusionOptions(4, 0.5, 5.0, seed=12), **callables)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).max() > 0


def test_progress_reports_each_denoising_step(callables, embeddings):
    seen: list[tuple[int, int]] = []
    options = DiffusionOptions(steps=8, strength=0.5, guidance=2.0, seed=0)
    img2img(smooth_image(64, 64), embeddings, options, progress=lambda i, n: seen.append((i, n)), **callables)
    n = options.denoising_steps()
    assert n == 4
    assert seen == [(i, n) for i in range(1, n + 1)]


class RecordingUNet:
    """A numpy UNet that records its inputs and predicts uncond=a, cond=b so guidance is visible."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.fail_at = fail_at

    def __call__(self, sample, timestep, hidden):
        self.calls.append((sample.copy(), timestep.copy(), hidden.copy()))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("unet: injected failure")
        out = np.empty_like(sample)
        out[0], out[1] = 0.1, 0.3
        return out


def fake_models(unet):
    def vae_encode(x):
        assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
        b, _, h, w = x.shape
        return np.full((b, 4, h // 8, w // 8), 0.5, np.float32)

    def vae_decode(z):
        b, _, h, w = z.shape
        return np.tanh(np.repeat(np.repeat(z[:, :3], 8, axis=2), 8, axis=3))

    return dict(vae_encode=vae_encode, unet=unet, vae_decode=vae_decode,
                scheduler_config=SD15_SCHEDULER, scaling_factor=0.5)


def test_unet_gets_one_guidance_pair_per_step():
    unet = RecordingUNet()
    emb = np.random.default_rng(0).normal(size=(2, C.SD_TOKEN_LENGTH, 8)).astype(np.float32)
    options = DiffusionOptions(steps=6, strength=1.0, guidance=3.0, seed=0)
    out = img2img(np.zeros((64, 192, 3), np.uint8), emb, options, **fake_models(unet))
    assert out.shape == (64, 192, 3) and out.dtype == np.uint8
    assert len(unet.calls) == options.denoising_steps() == 6
    timesteps = []
    for sample, timestep, hidden in unet.calls:
        assert sample.shape == (2, 4, 8, 24) and sample.dtype == np.float32
        np.testing.assert_array_equal(sample[0], sample[1])  # the same latents, once per guidance branch
        assert timestep.shape == (2,) and timestep.dtype == np.dtype(C.UNET_TIMESTEP_DTYPE)
        assert timestep[0] == timestep[1]
        np.testing.assert_array_equal(hidden, emb)
        timesteps.append(timestep[0])
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 6


def test_guidance_1_makes_one_batch_1_call_per_step_on_the_prompt():
    """Guidance 1 is the prompt's prediction alone: no negative row computed and thrown away (diffusers)."""
    calls = []

    def unet(sample, timestep, hidden):
        calls.append((sample.shape, timestep.shape, hidden.copy()))
        return np.full_like(sample, 0.2)

    emb = np.random.default_rng(0).normal(size=(2, C.SD_TOKEN_LENGTH, 8)).astype(np.float32)
    options = DiffusionOptions(steps=4, strength=1.0, guidance=1.0, seed=0)
    img2img(np.zeros((64, 64, 3), np.uint8), emb, options, **fake_models(unet))
    assert [(c[0], c[1]) for c in calls] == [((1, 4, 8, 8), (1,))] * 4
    for _, _, hidden in calls:
        np.testing.assert_array_equal(hidden, emb[1:])


@pytest.mark.parametrize(("scheduler", "steps", "guidance"), [
    (C.DPM_SCHEDULER, C.DEFAULT_STEPS, C.DEFAULT_GUIDANCE), (C.LCM_SCHEDULER, C.LCM_STEPS, C.LCM_GUIDANCE),
])
def test_unset_steps_and_guidance_follow_the_scheduler(scheduler, steps, guidance):
    calls = []

    def unet(sample, timestep, hidden):
        calls.append(sample.shape[0])
        return np.full_like(sample, 0.2)

    emb = np.zeros((2, C.SD_TOKEN_LENGTH, 8), np.float32)
    image = np.zeros((64, 64, 3), np.uint8)
    img2img(image, emb, DiffusionOptions(), scheduler_cls=scheduler_class(scheduler), **fake_models(unet))
    assert DiffusionOptions().resolved(scheduler) == DiffusionOptions(steps, C.DEFAULT_STRENGTH, guidance)
    assert calls == [2 if guidance > 1 else 1] * int(steps * C.DEFAULT_STRENGTH)
    # Set values win over the scheduler's defaults.
    set_ones = DiffusionOptions(steps=9, guidance=3.0)
    assert set_ones.resolved(scheduler) == DiffusionOptions(9, C.DEFAULT_STRENGTH, 3.0)


def test_scheduler_class_names_the_allowed_ones():
    assert scheduler_class(C.LCM_SCHEDULER) is LCMScheduler
    with pytest.raises(ValueError, match=r"scheduler should be one of \['DPMSolverMultistepScheduler', "
                                         r"'LCMScheduler'\] but is 'Heun'"):
        scheduler_class("Heun")


def test_unet_failure_mid_loop_propagates_and_next_call_is_clean():
    emb = np.zeros((2, C.SD_TOKEN_LENGTH, 8), np.float32)
    image = smooth_image(64, 64)
    options = DiffusionOptions(steps=5, strength=1.0, guidance=2.0, seed=4)
    with pytest.raises(RuntimeError, match="injected failure"):
        img2img(image, emb, options, **fake_models(RecordingUNet(fail_at=3)))
    after = img2img(image, emb, options, **fake_models(RecordingUNet()))
    fresh = img2img(image, emb, options, **fake_models(RecordingUNet()))
    np.testing.assert_array_equal(after, fresh)


def test_model_returning_wrong_shape_names_the_model():
    models = fake_models(lambda s, t, h: s[:1])
    with pytest.raises(ValueError, match=r"unet returned shape \[1, 4, 8, 8\], expected \[2, 4, 8, 8\]"):
        img2img(smooth_image(64, 64), np.zeros((2, 77, 8), np.float32), DiffusionOptions(), **models)


@pytest.mark.parametrize(
    "options, message",
    [
        (DiffusionOptions(strength=1.3), "strength should be in (0.0, 1.0] but is 1.3"),
        (DiffusionOptions(strength=0.0), "strength should be in (0.0, 1.0] but is 0.0"),
        (DiffusionOptions(strength=float("nan")), "strength should be in (0.0, 1.0] but is nan"),
        (DiffusionOptions(steps=0), f"steps should be an integer in [1, {C.MAX_STEPS}] but is 0"),
        (DiffusionOptions(steps=C.MAX_STEPS + 1), f"but is {C.MAX_STEPS + 1}"),
        (DiffusionOptions(steps=2.5), "steps should be an integer"),
        (DiffusionOptions(guidance=C.MAX_GUIDANCE + 1), f"guidance should be in [{C.MIN_GUIDANCE}, "),
        (DiffusionOptions(guidance=0.5), "but is 0.5"),
        (DiffusionOptions(seed=-1), "seed should be an integer in [0, "),
        (DiffusionOptions(steps=3, strength=0.2), "steps * strength should be at least 1 but is 3 * 0.2"),
    ],
)
def test_options_check_names_the_option_and_range(options, message):
    with pytest.raises(ValueError) as err:
        options.check()
    assert message in str(err.value)


def test_default_options_and_numpy_scalars_are_valid():
    DiffusionOptions().check()  # unset steps and guidance: the scheduler's defaults, in range
    with pytest.raises(ValueError, match="steps is unset"):
        DiffusionOptions().denoising_steps()
    DiffusionOptions(np.int32(30), np.float32(0.5), np.float32(7.5), np.int64(2**40)).check()


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((64, 72, 3), np.uint8), "multiples of 64 pixels"),
        (np.zeros((64, 64, 3), np.float32), "image should be uint8 [H, W, 3]"),
        (np.zeros((64, 64), np.uint8), "image should be uint8 [H, W, 3]"),
    ],
)
def test_check_inputs_rejects_bad_images(image, message):
    with pytest.raises(ValueError) as err:
        check_inputs(image, np.zeros((2, 77, 8), np.float32), DiffusionOptions())
    assert message in str(err.value)


def test_check_inputs_rejects_bad_embeddings():
    with pytest.raises(ValueError, match=r"embeddings should be float32 \[2, 77, D\]"):
        check_inputs(np.zeros((64, 64, 3), np.uint8), np.zeros((1, 77, 8), np.float32), DiffusionOptions())


@pytest.mark.parametrize(
    "h, w", [(512, 512), (300, 200), (200, 300), (1000, 130), (37, 61), (4000, 3000), (1, 1)]
)
def test_sd_input_size_long_side_native_multiples_and_aspect(h, w):
    H, W = sd_input_size(h, w)
    m = C.SD_SIZE_MULTIPLE
    assert H % m == 0 and W % m == 0 and min(H, W) >= m
    assert max(H, W) == C.SD_NATIVE_SIZE
    # The short side is the nearest multiple to the aspect-kept size (or the minimum multiple).
    short, long_ = min(h, w), max(h, w)
    exact = short * C.SD_NATIVE_SIZE / long_
    assert abs(min(H, W) - exact) <= m / 2 or min(H, W) == m
    assert (H >= W) == (h >= w)


def test_sd_input_size_rejects_empty_crops():
    with pytest.raises(ValueError, match=r"crop size should be positive but is \(h=0, w=5\)"):
        sd_input_size(0, 5)
