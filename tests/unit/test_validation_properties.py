"""Property tests: on any bytes and any arrays, the validators and the decoder either return valid values or
raise ValueError (which the adapters turn into INVALID_ARGUMENT). Any other exception would fail the request
as an internal error, or worse, crash a stub."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from isekai import constants as C
from isekai.ensemble.images import decode_image
from isekai.ensemble.requests import validate_segment, validate_swap

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
W, H = 40, 30  # the valid photo's size: small, so hundreds of decodes stay fast


def _png(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


PHOTO = _png(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
JPEG = _png(np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8), "JPEG")


@st.composite
def corrupted(draw, source: bytes) -> bytes:
    """A valid file with some bytes changed, cut short or extended: reaches the decoders, not only the
    sniffers."""
    data = bytearray(source)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=16))


image_bytes = st.one_of(st.binary(max_size=256), corrupted(PHOTO), corrupted(JPEG), st.just(PHOTO))

any_dtype = st.one_of(
    hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.boolean_dtypes(),
    hnp.complex_number_dtypes(), st.just(np.dtype(object)), hnp.byte_string_dtypes(),
    hnp.unicode_string_dtypes(),
)
coordinate = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-10, 60)


@st.composite
def any_array(draw, max_dims: int = 3) -> np.ndarray:
    """Arrays of any dtype and a small shape; float ones with NaN and infinities."""
    dtype = draw(any_dtype)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5))
    if dtype.kind == "O":
        return np.array(draw(st.lists(st.one_of(st.none(), st.integers(), st.binary(max_size=4),
                                                st.text(max_size=3)),
                                      min_size=1, max_size=4)), dtype=object)
    return draw(hnp.arrays(dtype, shape))


@st.composite
def clicks(draw):
    """Mostly well-formed clicks (inside, outside, NaN, too many), sometimes arbitrary arrays."""
    if draw(st.booleans()):
        return draw(any_array()), draw(any_array()), draw(st.none() | any_array(2))
    n = draw(st.integers(0, C.MAX_POINTS + 2))
    points = np.array(draw(st.lists(st.tuples(coordinate, coordinate), min_size=n, max_size=n)), np.float32)
    labels = np.array(draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n)), np.int32)
    box = draw(
        st.none() | st.lists(coordinate, min_size=4, max_size=4).map(lambda b: np.array(b, np.float32))
    )
    return points.reshape(-1, 2), labels, box


def check_request(req) -> None:
    """The invariants every accepted request satisfies."""
    h, w = req.image.shape[:2]
    assert req.image.dtype == np.uint8 and req.image.shape == (h, w, 3)
    assert min(h, w) >= C.MIN_IMAGE_SIDE and h * w <= C.MAX_IMAGE_PIXELS
    pts, lbl, box = req.clicks.points, req.clicks.labels, req.clicks.box
    assert pts.dtype == np.float32 and pts.ndim == 2 and pts.shape[1] == 2 and pts.shape[0] <= C.MAX_POINTS
    assert lbl.dtype == np.int32 and lbl.shape == (pts.shape[0],) and set(lbl.tolist()) <= {0, 1}
    assert np.isfinite(pts).all() and (pts[:, 0] >= 0).all() and (pts[:, 0] <= w).all()
    assert (pts[:, 1] >= 0).all() and (pts[:, 1] <= h).all()
    if box is None:
        assert (lbl == 1).any()
    else:
        x0, y0, x1, y1 = box.tolist()
        assert box.dtype == np.float32 and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


@SETTINGS
@given(data=image_bytes)
def test_decode_image_returns_rgb_or_raises_value_error(data):
    try:
        rgb = decode_image(data)
    except ValueError as err:
        assert "image" in str(err)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous
    assert min(rgb.shape[:2]) >= C.MIN_IMAGE_SIDE


@SETTINGS
@given(image=st.one_of(image_bytes, any_array(1)), prompt=clicks(), mask_input=st.none() | any_array(4))
def test_validate_segment_accepts_or_raises_value_error(image, prompt, mask_input):
    points, labels, box = prompt
    try:
        req = validate_segment(image if isinstance(image, np.ndarray) else np.array([image], dtype=object),
                               points, labels, box, mask_input)
    except ValueError:
        return
    check_request(req)
    if req.mask_input is not None:
        assert req.mask_input.shape == (1, 1, C.SAM_LOW_RES_SIZE, C.SAM_LOW_RES_SIZE)
        assert req.mask_input.dtype == np.float32 and np.isfinite(req.mask_input).all()


scalar = st.one_of(
    st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=8), st.binary(max_size=8), any_array(1),
)


@SETTINGS
@given(prompt=clicks(), character=scalar | st.sampled_from(["default", "Asuka_2", "../x", ""]), text=scalar,
       strength=scalar, steps=scalar, guidance=scalar, seed=scalar,
       fmt=scalar | st.sampled_from(["png", "JPG", "webp", "gif"]))
def test_validate_swap_accepts_or_raises_value_error(prompt, character, text, strength, steps, guidance, seed,
                                                     fmt):
    points, labels, box = prompt
    try:
        req = validate_swap(np.array([PHOTO], dtype=object), points, labels, box, character=character,
                            prompt=text, strength=strength, steps=steps, guidance=guidance, seed=seed,
                            format=fmt)
    except ValueError:
        return
    check_request(req)
    o = req.options
    # Unset steps / guidance travel as STEPS_UNSET / GUIDANCE_UNSET (the scheduler's defaults, filled in
    # later).
    assert 0.0 < o.strength <= 1.0
    assert o.steps == C.STEPS_UNSET or (1 <= o.steps <= C.MAX_STEPS and int(o.steps * o.strength) >= 1)
    assert o.guidance == C.GUIDANCE_UNSET or (C.MIN_GUIDANCE <= o.guidance <= C.MAX_GUIDANCE
                                              and math.isfinite(o.guidance))
    assert 0 <= o.seed <= C.MAX_SEED and o.format in C.OUTPUT_FORMATS
    assert o.prompt is None or 0 < len(o.prompt) <= C.MAX_PROMPT_CHARS


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_input_format_decodes_to_its_size(fmt):
    rgb = np.random.default_rng(2).integers(0, 255, (H, W, 3), dtype=np.uint8)
    assert decode_image(_png(rgb, fmt)).shape == (H, W, 3)
