"""The ``finish`` stage: the optional upscale of the composed scene, then its encoding (the public
``result``).

The requested factor (the ``upscale`` input: 1, 2 or 4) need not be the exported graph's scale: a repository
holds one Real-ESRGAN graph (RealESRGAN_x4plus and x4plus_anime_6B are x4, RealESRGAN_x2plus is x2). As
Real-ESRGAN's own inference does with ``--outscale``, the scene is upscaled by the graph's scale (tiled:
:func:`isekai.ensemble.upscale.upscale_image`) and then resized to the requested size with Lanczos (Pillow's;
Real-ESRGAN uses OpenCV's LANCZOS4): x2 on a x4 graph runs x4 and halves it, x4 on a x2 graph runs x2 and
doubles it. The graph's own output may then hold more pixels than the result: ``(graph scale / factor)^2``
times.

The graph's scale is asked of the graph (:func:`probe_scale`, one call on a tiny image per request), not
remembered or read from a file, so it is always the scale of the graph the ``upscale`` model runs (also after
a re-export and a reload of that model).

Whether a repository has a graph at all is :func:`require_upscale_graph`'s question; preprocess asks it before
any model runs, so a request for an upscale this server cannot give fails at once, not after the diffusion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from isekai import constants as C
from isekai.ensemble.images import encode_image
from isekai.ensemble.upscale import INPUT_MULTIPLE, UpscaleFn, check_upscale_size, upscale_image

_CHANNELS = 3


def upscale_graph(repository: str | Path) -> Path:
    """Where the exported Real-ESRGAN graph of a model repository lives (it may not exist)."""
    return Path(repository) / C.UPSCALE_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME


def missing_graph_message() -> str:
    """What to do about a repository without the graph: every refusal that follows from it says this. Callers
    see it, so it names the graph relative to the repository, not the server's own paths."""
    graph = f"{C.UPSCALE_MODEL}/{C.MODEL_VERSION}/{C.ONNX_FILENAME}"
    return (
        f"the model repository has no Real-ESRGAN graph ({graph}); export one with `isekai export esrgan "
        f"--checkpoint RealESRGAN_x4plus.pth --repository REPOSITORY` (README: Super-resolution)"
    )


def require_upscale_graph(upscale: int, repository: str | Path) -> None:
    """ValueError naming ``upscale`` when a request asks for one (``upscale`` != 1) and ``repository`` has no
    graph."""
    if upscale != C.DEFAULT_UPSCALE and not upscale_graph(repository).is_file():
        raise ValueError(
            f"upscale {upscale} is not available on this server: {missing_graph_message()}; send "
            f"upscale {C.DEFAULT_UPSCALE} or leave it out"
        )


def probe_scale(upscale_fn: UpscaleFn) -> int:
    """The graph's scale (output side / input side): one call on a mid-gray ``UPSCALE_PROBE_SIDE`` square.

    RuntimeError (the model's fault, not the caller's) if the output is not ``[1, 3, s*side, s*side]`` with s
    a Real-ESRGAN scale (4, 2 or 1).
    """
    side = C.UPSCALE_PROBE_SIDE
    out_shape = tuple(np.shape(upscale_fn(np.full((1, _CHANNELS, side, side), 0.5, np.float32))))
    scale = out_shape[-1] // side if len(out_shape) == 4 else 0
    if scale not in INPUT_MULTIPLE or out_shape != (1, _CHANNELS, scale * side, scale * side):
        raise RuntimeError(
            f"{C.UPSCALE_MODEL} model returned shape {list(out_shape)} for a [1, 3, {side}, {side}] image; "
            f"expected [1, 3, s*{side}, s*{side}] with s one of {sorted(INPUT_MULTIPLE)}"
        )
    return scale


def resize_lanczos(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[h, w, 3]`` RGB -> uint8 ``[height, width, 3]``, Pillow's Lanczos (a=3) filter."""
    resized = Image.fromarray(image, "RGB").resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized)


def outscale(
    image: np.ndarray,
    factor: int,
    upscale_fn: UpscaleFn,
    *,
    graph_scale: int | None = None,
    tile: int = C.UPSCALE_TILE,
    tile_pad: int = C.UPSCALE_TILE_PAD,
    max_pixels: int = C.MAX_UPSCALED_PIXELS,
) -> np.ndarray:
    """Upscale an RGB scene by ``factor`` with the graph ``upscale_fn`` (see the module docstring).

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        factor: one of ``UPSCALE_FACTORS``; 1 returns ``image`` itself without calling the graph.
        upscale_fn: the graph, ``f32 [1, 3, h, w] in 0..1 -> f32 [1, 3, s*h, s*w]`` (one call per tile).
        graph_scale: the graph's scale s if known; None asks the graph (:func:`probe_scale`).
        tile, tile_pad: tiling of the graph's input (:func:`isekai.ensemble.upscale.upscale_image`).
        max_pixels: most pixels of the result; the graph's own output may hold ``(s / factor)^2`` times as
            many.
    Returns:
        uint8 ``[factor*H, factor*W, 3]``.
    """
    if factor not in C.UPSCALE_FACTORS:
        raise ValueError(f"upscale must be one of {C.UPSCALE_FACTORS} but is {factor!r}")
    if factor == C.DEFAULT_UPSCALE:
        return image
    height, width = image.shape[:2]
    out_h, out_w = check_upscale_size(height, width, factor, max_pixels)
    scale = probe_scale(upscale_fn) if graph_scale is None else graph_scale
    # The graph's output is allowed as much more than the result as its scale is bigger: the limit is the
    # result's.
    graph_pixels = max_pixels * max(1, (scale * scale) // (factor * factor))
    upscaled = upscale_image(image, upscale_fn, scale, tile=tile, tile_pad=tile_pad, max_pixels=graph_pixels)
    if scale == factor:
        return upscaled
    return resize_lanczos(upscaled, out_h, out_w)


def finish_result(scene: np.ndarray, factor: int, fmt: str, upscale_fn: UpscaleFn) -> bytes:
    """The ``finish`` stage: the public ``result``, the scene upscaled by ``factor`` and encoded as ``fmt``.

    Args:
        scene: uint8 ``[H, W, 3]`` RGB, compose's output at the photo's size.
        factor: the request's ``upscale`` (1: the scene as it is).
        fmt: one of ``OUTPUT_FORMATS``.
        upscale_fn: the ``upscale`` graph (BLS calls in ``model.py``, numpy fakes in tests); unused for factor
            1.
    """
    return encode_image(outscale(scene, factor, upscale_fn), fmt)
