"""Small checkpoints in the real on-disk formats, exported into a model repository (tests and the demo).

``isekai export demo --repository DIR`` makes random-weight checkpoints exactly as users bring them — a SAM
``.pth`` from segment-anything's builder, a big-lama style ``best.ckpt`` + ``config.yaml``, a diffusers SD 1.x
folder, a Real-ESRGAN ``.pth`` (``{"params_ema": ...}`` of a tiny x4 RRDBNet) — and runs the same exporters on
them. Re-running skips checkpoints and graphs that already exist.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from isekai import constants as C
from isekai.ensemble.characters import CharacterStore, PipelineConfig
from isekai.export.common import progress

SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
DEMO_CHARACTER_PROMPT = "anime girl, cel shading, clean line art, vivid colors"
# A second character, drawn by the same base UNet through a LoRA adapter (a random kohya-layout LoRA).
DEMO_LORA_CHARACTER = "lora-demo"
DEMO_LORA_PROMPT = "a photo of sks girl, anime style"
# The upscale graph: a tiny x4 RRDBNet (every part of RealESRGAN_x4plus, fewer and narrower), in the official
# format.
DEMO_ESRGAN_VARIANT = "tiny"
DEMO_ESRGAN_CHECKPOINT = "RealESRGAN_tiny.pth"
# The LCM twin of the demo repository (tests, bench --quick): the demo's SD folder with a random LoRA shaped
# like the published LCM-LoRA fused in, sampled by diffusers' LCMScheduler. Rank 8 on the tiny UNet; scale
# alpha / rank = 0.5.
DEMO_LCM_LORA = "lcm-lora-tiny.safetensors"
DEMO_LCM_RANK = 8
DEMO_LCM_ALPHA = 4.0


def copy_configs(destination: Path, source: Path = SOURCE_REPOSITORY) -> None:
    """Copy the repository's configs and model.py files (not exported artifacts) into ``destination``."""
    if not source.is_dir():
        raise FileNotFoundError(f"model repository sources not found at {source}")
    ignore = shutil.ignore_patterns("*.onnx", "*.onnx.data", "*.plan", "__pycache__", "characters",
                                    "tokenizer")
    shutil.copytree(source, destination, ignore=ignore, dirs_exist_ok=True)


def _missing(repository: Path, *models: str) -> bool:
    return any(not (repository / m / C.MODEL_VERSION / C.ONNX_FILENAME).exists() for m in models)


def _current(repository: Path) -> bool:
    """The repository's SD data was written by this version (an older one lacks LoRA slots and
    fingerprints)."""
    try:
        PipelineConfig.load(repository)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _add_demo_lora(repository: Path, path: Path) -> None:
    """A random LoRA over every slotted layer, in kohya's layout, registered as a second character."""
    from isekai.export.characters import Base, add_lora_character  # noqa: PLC0415
    from isekai.export.make_lora import random_factors, write_lora  # noqa: PLC0415

    base = Base.load(repository)
    unet = random_factors(base.slots[C.UNET_MODEL], rank=4, seed=1)
    text = random_factors(base.slots[C.TEXT_ENCODER_MODEL], rank=4, seed=2)
    write_lora(path, unet, text, layout="kohya", alpha=2.0)
    add_lora_character(repository, DEMO_LORA_CHARACTER, path, DEMO_LORA_PROMPT, replace=True)


def build_demo_repository(repository: Path, checkpoints: Path, *, force: bool = False) -> Path:
    """Make the small checkpoints under ``checkpoints`` and export them into ``repository`` (configs
    included)."""
    from isekai.export.esrgan import export_esrgan  # noqa: PLC0415 - torch-heavy, only when asked
    from isekai.export.lama import export_lama  # noqa: PLC0415
    from isekai.export.make_esrgan import make_esrgan_checkpoint  # noqa: PLC0415
    from isekai.export.make_lama import make_lama_checkpoint  # noqa: PLC0415
    from isekai.export.make_sam import make_sam_checkpoint  # noqa: PLC0415
    from isekai.export.make_sd import make_sd_folder  # noqa: PLC0415
    from isekai.export.sam import export_sam  # noqa: PLC0415
    from isekai.export.sd import export_sd  # noqa: PLC0415

    started = time.perf_counter()
    repository, checkpoints = Path(repository), Path(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    copy_configs(repository)

    sam_ckpt = checkpoints / "sam_tiny.pth"
    if force or not sam_ckpt.exists():
        progress(f"making a tiny SAM checkpoint {sam_ckpt}")
        make_sam_checkpoint(sam_ckpt, model_type="tiny")
    if force or _missing(repository, C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL):
        export_sam(sam_ckpt, "auto", repository=repository)

    lama_dir = checkpoints / "lama-small"
    if force or not (lama_dir / "models" / "best.ckpt").exists():
        progress(f"making a small LaMa checkpoint {lama_dir}")
        make_lama_checkpoint(lama_dir)
    if force or _missing(repository, C.LAMA_MODEL):
        export_lama(lama_dir / "models" / "best.ckpt", lama_dir / "config.yaml", repository=repository)

    sd_dir = checkpoints / "sd-tiny"
    if force or not (sd_dir / "model_index.json").exists():
        progress(f"making a tiny Stable Diffusion folder {sd_dir}")
        make_sd_folder(sd_dir, size="tiny")
    sd_models = (C.TEXT_ENCODER_MODEL, C.UNET_MODEL, C.VAE_ENCODER_MODEL, C.VAE_DECODER_MODEL)
    if force or _missing(repository, *sd_models) or not _current(repository):
        export_sd(sd_dir, repository=repository, character=C.DEFAULT_CHARACTER, prompt=DEMO_CHARACTER_PROMPT)
    if force or DEMO_LORA_CHARACTER not in CharacterStore(repository).names():
        _add_demo_lora(repository, checkpoints / "lora-demo.safetensors")

    esrgan_ckpt = checkpoints / DEMO_ESRGAN_CHECKPOINT
    if force or not esrgan_ckpt.exists():
        progress(f"making a tiny Real-ESRGAN checkpoint {esrgan_ckpt}")
        make_esrgan_checkpoint(esrgan_ckpt, variant=DEMO_ESRGAN_VARIANT)
    if force or _missing(repository, C.UPSCALE_MODEL):
        export_esrgan(esrgan_ckpt, repository=repository)
    progress(f"demo repository ready in {repository} ({time.perf_counter() - started:.0f}s)")
    return repository


def lcm_lora_factors(unet, rank: int = DEMO_LCM_RANK, seed: int = 5) -> dict:
    """Random (down, up) factors on the layers of ``unet`` (torch) that the published LCM-LoRA adapts."""
    from isekai.export import lora_slots  # noqa: PLC0415
    from isekai.export.make_lora import layer_shapes, lcm_lora_layers, random_factors  # noqa: PLC0415

    paths = lcm_lora_layers(lora_slots.unet_layers(unet, "all"))
    return random_factors(layer_shapes(unet, paths), rank=rank, seed=seed, strength=1.0)


def make_lcm_lora(
    sd_folder: Path, path: Path, rank: int = DEMO_LCM_RANK, alpha: float = DEMO_LCM_ALPHA
) -> Path:
    """Write a random LCM-LoRA-shaped LoRA for the SD folder's UNet in kohya's layout with ``.alpha`` (as
    latent-consistency/lcm-lora-sdv1-5 ships it): random weights, the real format and layers."""
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    from isekai.export.make_lora import write_lora  # noqa: PLC0415

    unet = UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet", local_files_only=True)
    return write_lora(path, lcm_lora_factors(unet, rank), layout="kohya", alpha=alpha)


def link_models(source: Path, destination: Path, models: tuple[str, ...]) -> None:
    """Hard-link (or copy) ``source``'s exported graphs of ``models`` into ``destination`` (same layout)."""
    for model in models:
        folder = source / model / C.MODEL_VERSION
        for path in folder.glob(f"{C.ONNX_FILENAME}*"):
            target = destination / model / C.MODEL_VERSION / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(path, target)
            except OSError:  # another file system
                shutil.copy2(path, target)


def build_lcm_repository(repository: Path, base: Path, checkpoints: Path, *, sam: Path | None = None) -> Path:
    """The demo repository's LCM twin: ``base``'s (a built demo repository) SAM, LaMa and upscale graphs (SAM
    from the repository ``sam`` instead, e.g. a vit_t export), and the demo's SD folder (under
    ``checkpoints``) exported with a random LCM-LoRA fused (:data:`DEMO_LCM_LORA`). Re-running skips what
    exists."""
    from isekai.export.sd import export_sd  # noqa: PLC0415

    repository, base, checkpoints = Path(repository), Path(base), Path(checkpoints)
    copy_configs(repository)
    link_models(Path(sam) if sam else base, repository, (C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL))
    link_models(base, repository, (C.LAMA_MODEL, *C.OPTIONAL_ONNX_MODELS))
    lora = checkpoints / DEMO_LCM_LORA
    sd_dir = checkpoints / "sd-tiny"
    if not lora.exists():
        make_lcm_lora(sd_dir, lora)
    sd_models = (C.TEXT_ENCODER_MODEL, C.UNET_MODEL, C.VAE_ENCODER_MODEL, C.VAE_DECODER_MODEL)
    current = _current(repository) and PipelineConfig.load(repository).scheduler == C.LCM_SCHEDULER
    if _missing(repository, *sd_models) or not current:
        export_sd(sd_dir, repository=repository, character=C.DEFAULT_CHARACTER, prompt=DEMO_CHARACTER_PROMPT,
                  lcm_lora=lora)
    return repository


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True,
                        help="model repository to create or complete")
    parser.add_argument(
        "--checkpoints", type=Path, default=None,
        help="where the small checkpoints go (default: <repository>/../checkpoints)",
    )
    parser.add_argument("--force", action="store_true",
                        help="remake checkpoints and re-export even if present")


def main(args: argparse.Namespace) -> int:
    checkpoints = args.checkpoints or args.repository.resolve().parent / "checkpoints"
    build_demo_repository(args.repository, checkpoints, force=args.force)
    return 0
