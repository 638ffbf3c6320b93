"""The pictures DreamBooth-LoRA trains on: the character's photos, and class images for prior preservation.

:mod:`isekai.export.train_lora` trains; this module lists, decodes, sizes and crops what it trains on:

- :func:`list_photos` / :func:`load_photos`: a folder of png/jpg/jpeg/webp files, each made RGB (EXIF-rotated)
  and resized so that its short side is the training ``resolution`` (uint8 [3, H, W]); every file is decoded
  up front, so a bad one fails before any model is loaded;
- :func:`crop`: the ``resolution`` x ``resolution`` window a step trains on (float32 [3, R, R] in -1..1): a
  random one, mirrored left-right half of the time, from a seeded generator (``augment``, the default), or
  the centre one (``augment=False``, ``--center-crop``);
- :func:`prepare_class_images`: tops a class-image folder up to the number asked, drawing the missing
  images with the base model (diffusers' ``StableDiffusionPipeline``) from the class prompt, and loads them
  as photos.

Randomness: :func:`seeded_generator` gives each item of each random stream of a run (:data:`STEP_STREAM`,
...) a generator seeded by ``(seed, stream, index)`` alone, so no draw depends on the draws before it: class
image n is the same after a crash, and a resumed training run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from isekai.export.common import progress
from isekai.export.sd import SdModels

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLASS_IMAGES_PER_CALL = 4  # class images the pipeline draws per call (each from its own generator)
# The independent random streams of one run, numbered here only so that no two ever share a seed: each step's
# draws, each epoch's photo order, each epoch's class-image order, each generated class image.
STEP_STREAM, PHOTO_ORDER_STREAM, CLASS_ORDER_STREAM, CLASS_IMAGE_STREAM = range(4)


def seeded_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for item ``index`` of one random ``stream`` of the run seeded ``seed``.

    Seeded from the three numbers alone (mixed by numpy's SeedSequence), so a draw never depends on how many
    draws came before it: what makes resuming exact.
    """
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


# --- photos -------------------------------------------------------------------------------------------------


def list_photos(folder: str | Path, *, allow_empty: bool = False) -> list[Path]:
    """The photo files in ``folder``, sorted by name; ValueError if there are none or a file is no photo.

    Hidden files (``.DS_Store``, partial writes) and subfolders are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in files:
        if path.suffix.lower() not in PHOTO_SUFFIXES:
            raise ValueError(
                f"{path} is not a photo: the image folder should hold only {'/'.join(PHOTO_SUFFIXES)}"
            )
    if not files and not allow_empty:
        raise ValueError(f"image folder {folder} holds no photos ({'/'.join(PHOTO_SUFFIXES)})")
    return files


def load_photo(path: Path, resolution: int) -> torch.Tensor:
    """uint8 [3, H, W] RGB, EXIF-rotated, resized so that min(H, W) == ``resolution``.

    ValueError naming the file if it cannot be decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")  # also decodes the whole file
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken PNGs
        raise ValueError(f"{path} is not a readable image: {e}") from e
    scale = resolution / min(image.size)
    size = tuple(max(resolution, round(side * scale)) for side in image.size)
    image = image.resize(size, Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def load_photos(paths: Sequence[Path], resolution: int) -> list[torch.Tensor]:
    """:func:`load_photo` of each path (all decoded now, so a bad file fails before training starts)."""
    return [load_photo(path, resolution) for path in paths]


def crop(photo: torch.Tensor, resolution: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [3, H, W] with min(H, W) >= ``resolution`` -> float32 [3, R, R] in -1..1 (R = ``resolution``).

    With a generator: a uniformly random window, mirrored left-right with probability 1/2. Without: the centre
    window, as it is.
    """
    _, height, width = photo.shape
    if generator is None:
        top, left, flip = (height - resolution) // 2, (width - resolution) // 2, False
    else:
        top = int(torch.randint(height - resolution + 1, (), generator=generator))
        left = int(torch.randint(width - resolution + 1, (), generator=generator))
        flip = bool(torch.randint(2, (), generator=generator))
    window = photo[:, top : top + resolution, left : left + resolution]
    if flip:
        window = window.flip(-1)
    return window.float() / 127.5 - 1.0


# --- class images (prior preservation) ----------------------------------------------------------------------


def prepare_class_images(
    models: SdModels,
    prompt: str,
    folder: Path,
    count: int,
    resolution: int,
    *,
    seed: int,
    inference_steps: int,
    fp16: bool,
    device: torch.device,
) -> list[torch.Tensor]:
    """The first ``count`` class images in ``folder`` as :func:`load_photos` loads them.

    The missing ones are drawn first (:func:`generate_class_images`, same arguments); the ones already there
    are reused, whatever drew them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    missing = count - len(list_photos(folder, allow_empty=True))
    if missing > 0:
        progress(f"generating {missing} class images of {prompt!r} into {folder}")
        generate_class_images(
            models,
            prompt,
            folder,
            missing,
            resolution,
            seed=seed,
            inference_steps=inference_steps,
            fp16=fp16,
            device=device,
        )
    return load_photos(list_photos(folder)[:count], resolution)


def generate_class_images(
    models: SdModels,
    prompt: str,
    folder: Path,
    count: int,
    resolution: int,
    *,
    seed: int,
    inference_steps: int,
    fp16: bool,
    device: torch.device,
) -> list[Path]:
    """Draw ``count`` images of ``prompt`` with the base model into ``folder`` as ``class-NNNN.png``.

    Image n comes from its own generator seeded by (``seed``, n): after a crash, a rerun gives the same set.
    Sides are ``resolution``; ``inference_steps`` denoising steps with the folder's own scheduler and the
    pipeline's default guidance, autocast to float16 on ``device`` with ``fp16``.
    """
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    jobs = _free_class_names(folder, count)
    # The already-loaded modules, so the base weights are not read (and held) twice.
    pipe = StableDiffusionPipeline.from_pretrained(
        str(models.folder),
        local_files_only=True,
        unet=models.unet,
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=fp16)
    written: list[Path] = []
    with tqdm(total=count, desc="class images", unit="image", file=sys.stderr) as bar, autocast:
        for start in range(0, count, CLASS_IMAGES_PER_CALL):
            chunk = jobs[start : start + CLASS_IMAGES_PER_CALL]
            images = pipe(
                [prompt] * len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=inference_steps,
                generator=[seeded_generator(seed, CLASS_IMAGE_STREAM, n) for n, _ in chunk],
            ).images
            for (_, path), image in zip(chunk, images, strict=True):
                partial = path.with_name(f".{path.name}.partial")  # hidden: list_photos skips it
                image.save(partial, format="PNG")
                os.replace(partial, path)
                written.append(path)
            bar.update(len(chunk))
    return written


def _free_class_names(folder: Path, count: int) -> list[tuple[int, Path]]:
    """``count`` (n, folder/class-NNNN.png) pairs not yet taken in ``folder``, lowest n first."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in folder.iterdir()}
    jobs: list[tuple[int, Path]] = []
    n = 0
    while len(jobs) < count:
        if (name := f"class-{n:04d}.png") not in taken:
            jobs.append((n, folder / name))
        n += 1
    return jobs
