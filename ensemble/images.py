"""Image bytes in, RGB arrays out, and back: the request's photo decoded safely, the results encoded.

Decoding is the first code a request's bytes meet, so it refuses whatever it does not fully understand with a
``ValueError`` naming the input ``"image"``, the value found and what is allowed. Size limits are checked from
the file's header, before any pixel is decoded (a 50-byte PNG can declare 30000x30000 pixels).

Decisions (documented here once, quoted by the README):

- Formats: only :data:`isekai.constants.IMAGE_INPUT_FORMATS`; Pillow's other plugins (EPS runs Ghostscript,
  ...) are never reached.
- Orientation: the EXIF orientation tag is applied, so the array is what a viewer shows; clicks are in that
  frame.
- Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF, MPO): the first frame is used. Refusing them
  would refuse ordinary camera photos (MPO JPEGs carry a preview frame), and counting frames means decoding
  all of them.
- Transparency (RGBA, LA, PA, palette or grayscale with a transparent colour) is composited on white.
- 16-bit grayscale (``I;16*`` and ``I``) is scaled from 0..65535 to 0..255; 32-bit float (``F``) is read as
  0..1.
- CMYK and images with an embedded ICC profile are converted to sRGB with that profile (LittleCMS); if the
  profile is unusable, Pillow's plain conversion is used instead.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms, ImageOps

from isekai import constants as C

INPUT_NAME = "image"
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # the rotations by 90 degrees: width and height trade places
_WHITE = 255
_FORMAT_ALIASES = {"jpg": "jpeg"}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def probe_image(
    data: bytes,
    *,
    max_pixels: int = C.MAX_IMAGE_PIXELS,
    max_bytes: int = C.MAX_IMAGE_BYTES,
    min_side: int = C.MIN_IMAGE_SIDE,
) -> tuple[int, int]:
    """Return the displayed size ``(H, W)`` of an encoded image from its header alone (EXIF orientation
    applied).

    Cheap (no pixel is decoded) but not a full check: a truncated file passes here and fails in
    :func:`decode_image`. Raises ``ValueError`` as :func:`decode_image` does for the size limits.
    """
    with _open_checked(data, max_pixels=max_pixels, max_bytes=max_bytes, min_side=min_side) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # noqa: BLE001 - malformed EXIF is ignored here as exif_transpose would fail later
            orientation = None
    return (w, h) if orientation in _SWAPPING_ORIENTATIONS else (h, w)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = C.MAX_IMAGE_PIXELS,
    max_bytes: int = C.MAX_IMAGE_BYTES,
    min_side: int = C.MIN_IMAGE_SIDE,
) -> np.ndarray:
    """Decode an encoded photo into the array every later stage uses.

    Args:
        data: the encoded file (PNG, JPEG, WebP, GIF, BMP or TIFF), 1..``max_bytes`` bytes.
        max_pixels: largest allowed ``H * W``, checked from the header before decoding.
        max_bytes: largest allowed encoded size.
        min_side: smallest allowed height and width.

    Returns:
        uint8 ``[H, W, 3]`` RGB, C-contiguous, in the displayed orientation (see the module docstring for
        alpha, 16-bit, CMYK and multi-frame files).

    Raises:
        ValueError: naming ``image``, for empty, oversized, undersized, unsupported, corrupt or truncated
            input.
    """
    with _open_checked(data, max_pixels=max_pixels, max_bytes=max_bytes, min_side=min_side) as img:
        fmt = img.format
        try:
            img.load()  # the first frame only; decodes the pixels and detects truncation
            oriented = ImageOps.exif_transpose(img)
        # Pillow's decoders raise OSError, SyntaxError, struct.error, zlib.error, ...
        except Exception as exc:
            raise ValueError(f"{INPUT_NAME}: the {fmt} data could not be decoded ({exc}); send a complete, "
                             f"valid {'/'.join(C.IMAGE_INPUT_FORMATS)} file") from exc
    try:
        rgb = _to_rgb(oriented)
    except Exception as exc:  # an exotic mode Pillow cannot convert (e.g. LAB) is the input's fault, not ours
        raise ValueError(f"{INPUT_NAME}: {fmt} image of mode {oriented.mode!r} cannot be converted to RGB "
                         f"({exc})"
                         ) from exc
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    return rgb if rgb.flags.writeable else rgb.copy()  # Pillow's array views are read-only


def normalize_format(fmt: str) -> str:
    """Return the canonical output format name (``"png"``, ``"jpeg"`` or ``"webp"``) for ``fmt``.

    Case-insensitive; ``"jpg"`` means ``"jpeg"``. Raises ``ValueError`` naming ``format`` otherwise.
    """
    if not isinstance(fmt, str):
        raise ValueError(f"format must be one of {list(C.OUTPUT_FORMATS)} but is {fmt!r}")
    name = fmt.strip().lower()
    name = _FORMAT_ALIASES.get(name, name)
    if name not in C.OUTPUT_FORMATS:
        raise ValueError(f"format must be one of {list(C.OUTPUT_FORMATS)} but is {fmt!r}")
    return name


def encode_image(rgb: np.ndarray, fmt: str = C.DEFAULT_FORMAT) -> bytes:
    """Encode an RGB array as PNG, JPEG (quality ``JPEG_QUALITY``) or WebP (quality ``WEBP_QUALITY``).

    Args:
        rgb: uint8 ``[H, W, 3]`` RGB.
        fmt: one of ``OUTPUT_FORMATS`` (see :func:`normalize_format`).

    Returns:
        The encoded file. The same array gives the same bytes (no timestamps or other varying metadata).
    """
    arr = _check_rgb(rgb, "rgb")
    name = normalize_format(fmt)
    options: dict[str, object] = {}
    if name == "jpeg":
        options["quality"] = C.JPEG_QUALITY
    elif name == "webp":
        options["quality"] = C.WEBP_QUALITY
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=_PIL_FORMAT[name], **options)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Encode a boolean mask ``[H, W]`` as a grayscale PNG: 255 where True, 0 elsewhere."""
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"mask must be a non-empty [H, W] array but has shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.where(arr.astype(bool), np.uint8(255), np.uint8(0)), "L").save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_mask`: PNG bytes -> bool ``[H, W]`` (pixels >= 128 are True)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            return np.asarray(img.convert("L")) >= 128
    except Exception as exc:
        raise ValueError(f"mask: not a PNG mask ({exc})") from exc


# ------------------------------------------------------------------------------------------------------------
def _open_checked(data: bytes, *, max_pixels: int, max_bytes: int, min_side: int) -> Image.Image:
    """Open ``data`` lazily (header only) and enforce the byte, format and size limits."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{INPUT_NAME} must be encoded image bytes but is a {type(data).__name__}")
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size == 0:
        raise ValueError(f"{INPUT_NAME} is empty (0 bytes); send an encoded image of 1..{max_bytes} bytes")
    if size > max_bytes:
        raise ValueError(f"{INPUT_NAME} has {size} bytes; the limit is {max_bytes} bytes")
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=list(C.IMAGE_INPUT_FORMATS))
    except Image.DecompressionBombError as exc:  # Pillow's own, higher limit, checked from the header too
        raise ValueError(f"{INPUT_NAME} is too large ({exc}); the limit is {max_pixels} pixels") from exc
    except Exception as exc:  # UnidentifiedImageError, or a plugin choking on a malformed header
        raise ValueError(f"{INPUT_NAME} is not a supported image ({exc}); allowed formats: "
                         f"{', '.join(C.IMAGE_INPUT_FORMATS)}") from exc
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ValueError(f"{INPUT_NAME} is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels")
    if min(w, h) < min_side:
        img.close()
        raise ValueError(f"{INPUT_NAME} is {w}x{h}; each side must be at least {min_side} pixels")
    return img


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any decoded Pillow image to uint8 ``[H, W, 3]`` RGB (see the module docstring for the
    rules)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        gray = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return _gray_to_rgb(((gray * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        gray = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return _gray_to_rgb(np.rint(np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    ):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:]
        # Integer "over white": exact at alpha 0 and 255, rounded to nearest elsewhere.
        return ((rgba[..., :3] * alpha + _WHITE * (255 - alpha) + 127) // 255).astype(np.uint8)
    if mode in ("RGB", "CMYK") and img.info.get("icc_profile"):
        converted = _icc_to_srgb(img)
        if converted is not None:
            return np.asarray(converted)
    return np.asarray(img.convert("RGB"))


def _icc_to_srgb(img: Image.Image) -> Image.Image | None:
    """Apply the embedded ICC profile to get sRGB, or None when the profile is unusable (then plain
    conversion)."""
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        if img.mode == "RGB" and "srgb" in ImageCms.getProfileDescription(src).lower():
            return img  # already sRGB: a transform would only cost time
        return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # noqa: BLE001 - an unusable profile of any kind falls back to the plain conversion
        return None


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _check_rgb(rgb: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be [H, W, 3] but has shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 but is {arr.dtype}")
    return np.ascontiguousarray(arr)
