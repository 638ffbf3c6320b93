"""A LoRA fused into the base UNet's weights before export: the LCM-LoRA (``export sd --lcm-lora FILE``).

The published LCM-LoRA for SD 1.5 (``latent-consistency/lcm-lora-sdv1-5``: kohya-style ``lora_unet_...`` keys
with ``.alpha``; diffusers' layout reads the same) distils the base into a few-step sampler for diffusers'
``LCMScheduler``. It is fused into the UNet's torch weights (``W + scale * up @ down``, as diffusers'
``fuse_lora``) before the graph is exported, and the LoRA slots are added after, so characters' LoRAs still
apply per request on top of it: the served UNet computes ``W + dW_lcm + dW_character``, what diffusers
computes with both LoRAs loaded.

Why fused and not a base adapter stacked with each character's: the sum is the same, but fused it costs
nothing per step (a rank-64 adapter on every conv and linear layer adds ~20 % to a 3x3 conv's work at SD 1.5's
widths and runs a second pair of small matmuls per layer), every character's adapter stays its own size
instead of growing by the LCM-LoRA's rank (~130 MB float32 each), and a prompt-only character needs no adapter
at all. What fusing costs: the repository is an LCM repository (its scheduler and step defaults follow), and a
full fine-tune registered later needs the same LoRA fused into its own UNet, so the file is kept beside the
pipeline data (``diffusion/fused_lora/``) and its sha256 joins the base fingerprint: characters registered on
the plain base are reported as made for another base after switching, and the other way round.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from isekai.ensemble import characters as chars
from isekai.export import adapters, lora_formats, lora_slots

FUSED_LORA_PURPOSE = "lcm"


def read_unet_lora(
    path: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module
) -> lora_formats.Lora:
    """Read the LoRA at ``path`` against every Linear/Conv2d of ``unet``; ValueError if it adapts the text
    encoder (the LCM-LoRA adapts the UNet only, and the characters' prompt embeddings come from the plain text
    encoder) or adapts nothing."""
    layers = {lora_formats.UNET: lora_slots.unet_layers(unet, "all"),
              lora_formats.TEXT_ENCODER: lora_slots.text_encoder_layers(text_encoder)}
    lora = lora_formats.read_lora(path, layers)
    if lora.text_encoder:
        raise ValueError(f"{path} adapts {len(lora.text_encoder)} text encoder layers: a LoRA fused into the "
                         "base (--lcm-lora) must adapt the UNet only (the LCM-LoRA does)")
    if not lora.unet:
        raise ValueError(f"{path} adapts no UNet layer")
    return lora


def fuse(unet: torch.nn.Module, lora: lora_formats.Lora) -> None:
    """Add the LoRA's ``scale * up @ down`` to ``unet``'s weights in place (shapes checked per layer)."""
    adapters.fuse_into(unet, lora.unet)


def _sha256(path: Path) -> str:
    from isekai.export.sd import _hash_files  # noqa: PLC0415  (sd imports this module)

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return _hash_files(files)


def fingerprint(path: str | Path) -> str:
    """sha256 of the LoRA file (or of a PEFT / diffusers folder's files)."""
    return _sha256(Path(path))


def store(path: str | Path, lora: lora_formats.Lora, repository: str | Path) -> dict[str, Any]:
    """Copy the LoRA into ``<repository>/diffusion/fused_lora/`` and return its pipeline.json record."""
    path = Path(path)
    folder = chars.data_dir(repository) / chars.FUSED_LORA_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    target = folder / path.name
    if path.is_dir():
        shutil.copytree(path, target)
    else:
        shutil.copyfile(path, target)
    ranks = sorted({layer.rank for layer in lora.unet.values()})
    return {"file": f"{chars.FUSED_LORA_DIR}/{path.name}", "sha256": fingerprint(path), "layout": lora.layout,
            "layers": len(lora.unet), "ranks": ranks, "purpose": FUSED_LORA_PURPOSE, "source": path.name}


def fuse_stored(repository: str | Path, record: Mapping[str, Any], unet: torch.nn.Module,
                text_encoder: torch.nn.Module) -> None:
    """Fuse the repository's stored LoRA (``record``: PipelineConfig.fused_lora) into another ``unet`` (a full
    fine-tune registered on an LCM repository), checking it is still the file the base was exported with."""
    path = chars.data_dir(repository) / record["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the repository's base was exported with it fused "
                                "(export sd --lcm-lora again)")
    if fingerprint(path) != record.get("sha256"):
        raise ValueError(f"{path} changed since the base was exported (sha256 differs): export sd --lcm-lora "
                         "again")
    fuse(unet, read_unet_lora(path, unet, text_encoder))
