"""One validator per public request type, run before any model work.

:func:`validate_swap` (the ``isekai`` model) and :func:`validate_segment` (``isekai_segment``) take the
request's inputs as Triton hands them to a Python model (numpy arrays: BYTES as object arrays of ``bytes``,
scalars as ``[1]`` arrays) or as plain Python values, fill the optional ones from :mod:`isekai.constants`,
decode the image (clicks can only be checked against its size), and return a frozen dataclass. Anything wrong
raises ``ValueError`` naming the input, the value and what is allowed; the adapter turns it into an
``INVALID_ARG`` error for that request alone. Cheap checks run first, so a bad option costs no image decode.

Whether a character exists is the character store's question, not this module's: here a name only has to be
well formed (:data:`isekai.constants.CHARACTER_NAME_PATTERN`). Likewise whether the repository has an
``upscale`` graph (:func:`isekai.ensemble.finish.require_upscale_graph`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from isekai import constants as C
from isekai.ensemble.cache import image_key
from isekai.ensemble.images import decode_image, normalize_format, probe_image
from isekai.ensemble.upscale import check_upscale_size

_NUMERIC_KINDS = "iuf"


@dataclass(frozen=True, eq=False)
class Clicks:
    """The user's prompt for SAM, in original image pixels.

    Attributes:
        points: float32 ``[N, 2]`` ``(x, y)``, N in 0..``MAX_POINTS``.
        labels: int32 ``[N]`` 1 = the person, 0 = not the person.
        box: float32 ``[4]`` ``(x0, y0, x1, y1)`` with ``x0 < x1``, ``y0 < y1``, or None.
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None


@dataclass(frozen=True)
class SwapOptions:
    """The ``isekai`` model's optional inputs, defaults filled in (``steps`` and ``guidance`` left out stay
    :data:`~isekai.constants.STEPS_UNSET` / :data:`~isekai.constants.GUIDANCE_UNSET`: their defaults are the
    exported scheduler's, which the diffusion model knows)."""

    character: str
    prompt: str | None  # None: the character's own prompt
    strength: float
    steps: int  # STEPS_UNSET: the scheduler's default
    guidance: float  # GUIDANCE_UNSET: the scheduler's default
    seed: int
    format: str
    upscale: int = C.DEFAULT_UPSCALE  # the result's size over the photo's: 1 (off), 2 or 4


@dataclass(frozen=True, eq=False)
class SwapRequest:
    """A validated ``isekai`` request. ``image`` is uint8 ``[H, W, 3]`` RGB (decoded, EXIF-rotated)."""

    image: np.ndarray
    image_key: str
    clicks: Clicks
    options: SwapOptions


@dataclass(frozen=True, eq=False)
class SegmentRequest:
    """A validated ``isekai_segment`` request; ``mask_input`` is float32 ``[1, 1, 256, 256]`` or None."""

    image: np.ndarray
    image_key: str
    clicks: Clicks
    mask_input: np.ndarray | None


def validate_swap(
    image: Any,
    points: Any,
    labels: Any,
    box: Any = None,
    *,
    character: Any = None,
    prompt: Any = None,
    strength: Any = None,
    steps: Any = None,
    guidance: Any = None,
    seed: Any = None,
    format: Any = None,  # noqa: A002 - the public input's name
    upscale: Any = None,
) -> SwapRequest:
    """Validate an ``isekai`` request (see :mod:`isekai.client.api` for the tensors); None means "not
    sent"."""
    options = validate_options(character=character, prompt=prompt, strength=strength, steps=steps,
                               guidance=guidance, seed=seed, format=format, upscale=upscale)
    clicks = click_arrays(points, labels, box)
    data = image_bytes(image)
    rgb = decode_image(data)
    check_result_size(options, rgb.shape[:2])
    return SwapRequest(rgb, image_key(data), check_inside(clicks, rgb.shape[:2]), options)


def validate_segment(image: Any, points: Any, labels: Any, box: Any = None, mask_input: Any = None
                     ) -> SegmentRequest:
    """Validate an ``isekai_segment`` request; None means "not sent"."""
    low_res = validate_mask_input(mask_input)
    clicks = click_arrays(points, labels, box)
    data = image_bytes(image)
    rgb = decode_image(data)
    return SegmentRequest(rgb, image_key(data), check_inside(clicks, rgb.shape[:2]), low_res)


def precheck_swap(
    image: Any,
    points: Any,
    labels: Any,
    box: Any = None,
    mask_input: Any = None,
    **options: Any,
) -> SwapOptions:
    """:func:`validate_swap`'s checks that need no pixels: the options, ``mask_input``, the clicks, and the
    image's header (format, bytes, size, orientation; :func:`probe_image`) with the clicks inside it and the
    result's size.

    Cheap enough to run before a request is accepted (``isekai_stream`` answers a bad request with one error
    and nothing before it); a file whose pixels fail to decode passes here and is refused by the full
    validation."""
    parsed = validate_options(**options)
    validate_mask_input(mask_input)
    clicks = click_arrays(points, labels, box)
    size = probe_image(image_bytes(image))
    check_inside(clicks, size)
    check_result_size(parsed, size)
    return parsed


# -- the parts, usable on their own by a stage that only sees some inputs ------------------------------------
def validate_clicks(points: Any, labels: Any, box: Any, image_size: tuple[int, int]) -> Clicks:
    """:func:`click_arrays` then :func:`check_inside` for an image of ``(H, W)``."""
    return check_inside(click_arrays(points, labels, box), image_size)


def click_arrays(points: Any, labels: Any, box: Any) -> Clicks:
    """Shapes, types and values of the clicks, without the image: ``points`` ``[N, 2]``, ``labels`` ``[N]`` in
    {0, 1}, ``box`` ``[4]`` or None/empty, all finite, N <= ``MAX_POINTS``, and at least one positive click or
    a box. Coordinates stay float64 here (a huge value must fail the bounds check, not become inf)."""
    pts = _numeric_array("points", points)
    n = 0 if pts.size == 0 else (pts.shape[0] if pts.ndim == 2 and pts.shape[1] == 2 else -1)
    if n < 0:
        raise ValueError(f"points must be [N, 2] (x, y) pairs but has shape {pts.shape}")
    pts = pts.reshape(n, 2)
    if n > C.MAX_POINTS:
        raise ValueError(f"points has {n} clicks; at most {C.MAX_POINTS} are allowed")
    _check_finite("points", pts)
    lbl = _numeric_array("labels", labels)
    if lbl.size == 0:
        lbl = lbl.reshape(0)
    if lbl.ndim != 1 or lbl.shape[0] != n:
        raise ValueError(f"labels must be [N] with N = {n} (one per point) but has shape {lbl.shape}")
    bad = ~np.isin(lbl, (0, 1))
    if bad.any():
        raise ValueError(f"labels must be 0 (not the person) or 1 (the person) but contains {lbl[bad][0]!r}")
    bx = _numeric_array("box", box)
    if bx.size == 0:
        bx_out = None
    else:
        if bx.shape not in ((4,), (1, 4)):
            raise ValueError(f"box must be [4] (x0, y0, x1, y1) but has shape {bx.shape}")
        bx_out = bx.reshape(4)
        _check_finite("box", bx_out)
        x0, y0, x1, y1 = bx_out
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box must have x0 < x1 and y0 < y1 but is {bx_out.tolist()}")
    if bx_out is None and not (lbl == 1).any():
        raise ValueError(f"points/labels need at least one positive click (label 1), or send a box; got {n} "
                         f"point(s) with labels {lbl.astype(int).tolist()} and no box")
    return Clicks(pts, lbl.astype(np.int32), bx_out)


def check_inside(clicks: Clicks, image_size: tuple[int, int]) -> Clicks:
    """Every click and the box inside the ``(H, W)`` image (``0 <= x <= W``, ``0 <= y <= H``); returns the
    clicks as float32/int32."""
    h, w = int(image_size[0]), int(image_size[1])
    for i, (x, y) in enumerate(clicks.points):
        if not (0 <= x <= w and 0 <= y <= h):
            raise ValueError(f"points[{i}] = ({x:g}, {y:g}) is outside the {w}x{h} image; allowed "
                             f"0 <= x <= {w}, 0 <= y <= {h}")
    box = clicks.box
    if box is not None:
        x0, y0, x1, y1 = box
        if not (x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h):
            raise ValueError(f"box = {box.tolist()} is outside the {w}x{h} image; allowed 0 <= x <= {w}, "
                             f"0 <= y <= {h}")
        box = box.astype(np.float32)
    return Clicks(clicks.points.astype(np.float32), clicks.labels.astype(np.int32), box)


def check_denoising_steps(steps: int, strength: float, default: bool = False) -> None:
    """img2img runs ``int(steps * strength)`` steps: zero would return noise. ``default``: ``steps`` is the
    exported scheduler's default, the request left it out.

    preprocess checks both cases before the ensemble forks into lama and diffusion: in Triton 2.51 a step that
    fails beside another leaves the ensemble request counted in flight (a shutdown then waits its whole exit
    timeout for it)."""
    if int(steps * strength) < 1:
        origin = " (steps left out: the exported scheduler's default)" if default else ""
        raise ValueError(f"steps * strength must be >= 1 (img2img runs int(steps * strength) steps) but is "
                         f"{steps} * {strength:g}{origin}")


def check_default_steps(options: SwapOptions, default_steps: int) -> None:
    """:func:`check_denoising_steps` for a request that left ``steps`` out (diffusion will run the exported
    scheduler's ``default_steps``); a request that set them was checked by :func:`validate_options`."""
    if options.steps == C.STEPS_UNSET:
        check_denoising_steps(default_steps, options.strength, default=True)


def validate_options(
    *,
    character: Any = None,
    prompt: Any = None,
    strength: Any = None,
    steps: Any = None,
    guidance: Any = None,
    seed: Any = None,
    format: Any = None,  # noqa: A002 - the public input's name
    upscale: Any = None,
) -> SwapOptions:
    """The ``isekai`` model's optional inputs; None (or an empty tensor) takes the default from constants."""
    name = _text("character", character) or ""  # "": the repository's default character (the store knows it)
    if name and not re.fullmatch(C.CHARACTER_NAME_PATTERN, name):
        raise ValueError(f"character must match {C.CHARACTER_NAME_PATTERN!r} but is {name!r}")
    text = _text("prompt", prompt)
    if text is not None and not text.strip():
        text = None
    if text is not None and len(text) > C.MAX_PROMPT_CHARS:
        raise ValueError(f"prompt has {len(text)} characters; at most {C.MAX_PROMPT_CHARS} are allowed")
    strength_v = _real("strength", strength, C.DEFAULT_STRENGTH)
    if not 0.0 < strength_v <= 1.0:
        raise ValueError(f"strength must be in (0, 1] but is {strength_v}")
    # Left out, steps and guidance stay unset: the diffusion model fills in its scheduler's defaults (and
    # checks steps * strength against them).
    steps_v = _integer("steps", steps, C.STEPS_UNSET)
    if _one("steps", steps) is not None and not 1 <= steps_v <= C.MAX_STEPS:
        raise ValueError(f"steps must be in [1, {C.MAX_STEPS}] but is {steps_v}")
    if steps_v != C.STEPS_UNSET:
        check_denoising_steps(steps_v, strength_v)
    guidance_v = _real("guidance", guidance, C.GUIDANCE_UNSET)
    if _one("guidance", guidance) is not None and not C.MIN_GUIDANCE <= guidance_v <= C.MAX_GUIDANCE:
        raise ValueError(f"guidance must be in [{C.MIN_GUIDANCE}, {C.MAX_GUIDANCE}] but is {guidance_v}")
    seed_v = _integer("seed", seed, C.DEFAULT_SEED)
    if not 0 <= seed_v <= C.MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1] but is {seed_v}")
    fmt = _text("format", format)
    upscale_v = _integer("upscale", upscale, C.DEFAULT_UPSCALE)
    if upscale_v not in C.UPSCALE_FACTORS:
        allowed = ", ".join(str(f) for f in C.UPSCALE_FACTORS)
        raise ValueError(f"upscale must be one of {allowed} ({C.DEFAULT_UPSCALE} = off) but is {upscale_v}")
    return SwapOptions(name, text, strength_v, steps_v, guidance_v, seed_v,
                       C.DEFAULT_FORMAT if fmt is None else normalize_format(fmt), upscale_v)


def check_result_size(options: SwapOptions, image_size: tuple[int, int]) -> None:
    """The ``result`` of an ``(H, W)`` photo at ``options.upscale`` within ``MAX_UPSCALED_PIXELS`` and within
    what ``options.format`` can encode (``ENCODER_MAX_SIDE``); ValueError naming ``upscale``, the factor and
    the size otherwise. Needs the decoded size, so it runs after the decode (still before any model)."""
    height, width, factor = int(image_size[0]), int(image_size[1]), options.upscale
    if factor != C.DEFAULT_UPSCALE:
        check_upscale_size(height, width, factor)
    max_side = C.ENCODER_MAX_SIDE.get(options.format)
    if max_side is not None and factor * max(height, width) > max_side:
        raise ValueError(
            f"upscale x{factor} of a {height}x{width} (HxW) image would be "
            f"{factor * height}x{factor * width}, and format {options.format} holds at most {max_side} "
            "pixels a side; use png or a smaller upscale"
        )


def validate_mask_input(mask_input: Any) -> np.ndarray | None:
    """``mask_input``: None/empty, or float ``[1, 1, 256, 256]`` finite logits -> float32 (a copy)."""
    arr = _numeric_array("mask_input", mask_input)
    if arr.size == 0:
        return None
    low = C.SAM_LOW_RES_SIZE
    if arr.shape != (1, 1, low, low):
        raise ValueError(f"mask_input must be [1, 1, {low}, {low}] but has shape {arr.shape}")
    _check_finite("mask_input", arr)
    return arr.astype(np.float32)


def image_bytes(value: Any) -> bytes:
    """The encoded image from a Triton BYTES tensor (``[1]`` or ``[1, 1]`` object array) or bytes-like
    value."""
    if isinstance(value, np.ndarray):
        # Object arrays only: numpy's fixed-width bytes ("S") silently drop trailing NUL bytes.
        if value.dtype.kind != "O" or value.size != 1:
            raise ValueError("image must be one encoded image (a BYTES [1] object array) but is "
                             f"{value.dtype} {value.shape}")
        value = value.reshape(-1)[0]
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise ValueError(f"image must be encoded image bytes but is a {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------------------
def _numeric_array(name: str, value: Any) -> np.ndarray:
    """float64/int array of ``value`` (None -> empty); refuses strings, objects, complex, booleans."""
    if value is None:
        return np.zeros((0,), np.float64)
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} must be a numeric array but is {type(value).__name__} ({exc})") from exc
    if arr.size == 0:  # empty means "not sent", whatever its dtype (an empty BYTES tensor included)
        return np.zeros(arr.shape, np.float64)
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"{name} must be numeric but has dtype {arr.dtype}")
    return arr if arr.dtype.kind in "iu" else arr.astype(np.float64)


def _check_finite(name: str, arr: np.ndarray) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} must be finite but contains {arr[bad].reshape(-1)[0]!r}")


def _one(name: str, value: Any) -> Any:
    """A single value from a Python scalar, a 0-d/[1] array or a one-element list; None for None/empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = np.asarray(value, dtype=object)
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        if value.size != 1:
            raise ValueError(f"{name} must be a single value but has shape {value.shape}")
        value = value.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _text(name: str, value: Any) -> str | None:
    v = _one(name, value)
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} must be UTF-8 text but is {bytes(v)[:40]!r}") from exc
    if not isinstance(v, str):
        raise ValueError(f"{name} must be text but is a {type(v).__name__}")
    return v or None


def _real(name: str, value: Any, default: float) -> float:
    v = _one(name, value)
    if v is None:
        return float(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number but is {v!r}")
    try:
        number = float(v)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite but is {v}")
    return number


def _integer(name: str, value: Any, default: int) -> int:
    v = _one(name, value)
    if v is None:
        return int(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be an integer but is {v!r}")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise ValueError(f"{name} must be an integer but is {v}")
    return int(v)
