"""Decoding (formats, orientation, modes, limits, corrupt input) and encoding of images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from isekai import constants as C
from isekai.ensemble.images import (
    decode_image,
    decode_mask,
    encode_image,
    encode_mask,
    normalize_format,
    probe_image,
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, with a tiny IDAT (a decompression bomb's
    header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# -- formats and modes ---------------------------------------------------------------------------------------
def test_png_round_trip_is_exact():
    rgb = _pattern(23, 41)
    out = decode_image(_encode(Image.fromarray(rgb), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (23, 41, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_other_lossless_formats_decode_exactly(fmt):
    rgb = _pattern(20, 30, seed=1)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(rgb), fmt, **kw)), rgb)


def test_jpeg_decodes_close_to_the_source():
    rgb = np.full((32, 48, 3), (200, 40, 90), np.uint8)
    out = decode_image(_encode(Image.fromarray(rgb), "JPEG", quality=95))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).max() <= 4


@pytest.mark.parametrize(("orientation", "k"), [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation, k):
    rgb = _pattern(20, 36, seed=2)  # landscape, so a 90-degree rotation shows in the shape
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(rgb), "PNG", exif=exif)
    expected = np.rot90(rgb, k=k)  # 6: rotate 90 clockwise to display; 8: counter-clockwise; 3: 180
    np.testing.assert_array_equal(decode_image(data), expected)
    assert probe_image(data) == expected.shape[:2]


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    out = decode_image(_encode(Image.fromarray(gray, "L"), "PNG"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_palette_image_decodes_to_its_colors():
    rgb = _pattern(18, 18, seed=3)
    pal = Image.fromarray(rgb).quantize(colors=16)
    np.testing.assert_array_equal(decode_image(_encode(pal, "PNG")), np.asarray(pal.convert("RGB")))


def test_rgba_is_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (10, 100, 200)
    rgba[:, :4, 3] = 0  # transparent -> white
    rgba[:, 4:8, 3] = 255  # opaque -> the color
    rgba[:, 8:, 3] = 128  # half -> between
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")).astype(int)
    assert (out[:, :4] == 255).all()
    assert (out[:, 4:8] == (10, 100, 200)).all()
    expected = np.rint((np.array([10, 100, 200]) * 128 + 255 * 127) / 255)
    assert np.abs(out[:, 8:] - expected).max() <= 1


def test_la_and_transparent_palette_are_composited_on_white():
    la = np.zeros((16, 16, 2), np.uint8)
    la[..., 1] = 0
    assert (decode_image(_encode(Image.fromarray(la, "LA"), "PNG")) == 255).all()
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    pal.info["transparency"] = 1
    assert (decode_image(_encode(pal, "GIF", transparency=1)) == 255).all()


def test_16_bit_grayscale_is_scaled_to_8_bit():
    values = np.array([[0, 257 * 100, 65535, 257 * 7]], np.uint16)
    gray16 = np.repeat(np.repeat(values, 16, axis=0), 4, axis=1)  # 16 x 16
    img = Image.fromarray(gray16)
    assert img.mode.startswith("I;16")
    out = decode_image(_encode(img, "PNG"))
    np.testing.assert_array_equal(out[0, ::4, 0], [0, 100, 255, 7])
    assert (out[..., 0] == out[..., 2]).all()


def test_cmyk_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan... full magenta + yellow = red
    out = decode_image(_encode(cmyk, "JPEG", quality=95)).astype(int)
    assert out[..., 0].min() > 200 and out[..., 1:].max() < 60


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(buf.getvalue())
    assert (out == (255, 0, 0)).all()


# -- refusals ------------------------------------------------------------------------------------------------
def _refused(data, match: str, **kw) -> ValueError:
    with pytest.raises(ValueError, match=match) as err:
        decode_image(data, **kw)
    assert "image" in str(err.value)
    return err.value


@pytest.mark.parametrize("side", [5000, 30000])  # under and over Pillow's own bomb limit
def test_decompression_bomb_is_refused_from_the_header(monkeypatch, side):
    data = _png_header_only(side, side)
    assert len(data) < 200

    def no_pixels(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    err = _refused(data, f"{side * side}|{side}x{side}")
    assert f"the limit is {C.MAX_IMAGE_PIXELS} pixels" in str(err)
    with pytest.raises(ValueError, match="the limit is"):
        probe_image(data)


def test_over_max_pixels_is_refused():
    data = _encode(Image.fromarray(_pattern(100, 100)), "PNG")
    _refused(data, "10000 pixels; the limit is 5000", max_pixels=5000)
    assert decode_image(data, max_pixels=10000).shape == (100, 100, 3)


def test_too_small_is_refused():
    _refused(_encode(Image.fromarray(_pattern(8, 100)), "PNG"), f"at least {C.MIN_IMAGE_SIDE}")


def test_too_many_bytes_is_refused():
    data = _encode(Image.fromarray(_pattern(20, 20)), "PNG")
    _refused(data, f"{len(data)} bytes; the limit is 100", max_bytes=100)


@pytest.mark.parametrize("data", [b"", b"hello, this is not an image", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"])
def test_empty_and_garbage_are_refused(data):
    _refused(data, "image")


def test_non_bytes_is_refused():
    _refused("a string", "bytes")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_refused(fmt):
    data = _encode(Image.fromarray(_pattern(64, 64, seed=5)), fmt)
    _refused(data[: len(data) // 2], "could not be decoded")


def test_formats_outside_the_allow_list_are_refused():
    _refused(_encode(Image.fromarray(_pattern(20, 20)), "PPM"), "not a supported image")


# -- encoding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", C.OUTPUT_FORMATS)
def test_encode_is_deterministic_and_decodable(fmt):
    rgb = _pattern(40, 24, seed=6)
    first, second = encode_image(rgb, fmt), encode_image(rgb.copy(), fmt)
    assert first == second
    out = decode_image(first)
    assert out.shape == rgb.shape
    if fmt == "png":
        np.testing.assert_array_equal(out, rgb)


def test_encode_format_names():
    assert normalize_format("JPG") == "jpeg" and normalize_format(" PNG ") == "png"
    assert encode_image(_pattern(16, 16), "JPG")[:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match="format must be one of"):
        encode_image(_pattern(16, 16), "bmp")


@pytest.mark.parametrize("bad", [np.zeros((16, 16), np.uint8), np.zeros((16, 16, 3), np.float32),
                                 np.zeros((16, 16, 4), np.uint8)])
def test_encode_refuses_non_rgb(bad):
    with pytest.raises(ValueError, match="rgb must be"):
        encode_image(bad)


def test_mask_png_round_trip():
    mask = np.random.default_rng(7).random((30, 20)) > 0.5
    data = encode_mask(mask)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "L" and img.size == (20, 30)
        assert set(np.unique(np.asarray(img)).tolist()) <= {0, 255}
    np.testing.assert_array_equal(decode_mask(data), mask)
    with pytest.raises(ValueError, match="mask must be"):
        encode_mask(np.zeros((2, 2, 2), bool))
