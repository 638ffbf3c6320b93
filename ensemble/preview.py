"""A cheap look at the character while it is drawn: Stable Diffusion latents mapped to RGB by a linear map.

No VAE call: each latent cell becomes one pixel, ``rgb = latents^T @ SD_LATENT_RGB_FACTORS`` (the map previews
in the field use for SD 1.x), so a 512x384 crop (64x48 latents) previews as a 64x48 PNG of a few KB. It shows
the colours and the layout settling, not details; a viewer scales it up.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from isekai import constants as C


def latents_to_rgb(latents: np.ndarray) -> np.ndarray:
    """Latents -> a small RGB picture.

    Args:
        latents: float32 [1, 4, h, w] (or [4, h, w]), scaled as the UNet sees them (the VAE's mean times its
            scaling factor, plus noise).

    Returns:
        uint8 [h, w, 3] RGB, one pixel per latent cell.
    """
    arr = np.asarray(latents, dtype=np.float32)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(f"latents should be [1, 4, h, w] but are {list(arr.shape)}")
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != C.SD_LATENT_CHANNELS:
        raise ValueError(f"latents should be [{C.SD_LATENT_CHANNELS}, h, w] but are {list(arr.shape)}")
    factors = np.asarray(C.SD_LATENT_RGB_FACTORS, dtype=np.float32)  # [4, 3]
    rgb = np.einsum("chw,cr->hwr", arr, factors)  # about -1..1
    return (np.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def preview_png(latents: np.ndarray) -> bytes:
    """:func:`latents_to_rgb` encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(latents_to_rgb(latents)).save(buf, format="PNG")
    return buf.getvalue()


def is_preview_step(step: int, total: int, every: int = C.STREAM_PREVIEW_EVERY) -> bool:
    """Whether denoising step ``step`` (1-based, of ``total``) sends a preview: every ``every`` steps and the
    last."""
    return step == total or (every > 0 and step % every == 0)
