"""Request validators: defaults, Triton-shaped inputs, and one refusal per rule (naming input, value,
limit)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from isekai import constants as C
from isekai.ensemble.cache import image_key
from isekai.ensemble.requests import (
    SwapOptions,
    check_default_steps,
    check_result_size,
    validate_clicks,
    validate_options,
    validate_segment,
    validate_swap,
)

H, W = 48, 64


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _click(x=10.0, y=20.0):
    return np.array([[x, y]], np.float32), np.array([1], np.int32)


def test_swap_defaults(png):
    """No character means "" (the repository's default, which the character store knows), not a fixed name."""
    points, labels = _click()
    req = validate_swap(png, points, labels)
    assert req.image.shape == (H, W, 3) and req.image_key == image_key(png)
    assert req.clicks.points.dtype == np.float32 and req.clicks.labels.dtype == np.int32
    assert req.clicks.box is None
    # steps and guidance left out stay unset: the diffusion model fills in the exported scheduler's defaults.
    assert req.options == SwapOptions("", None, C.DEFAULT_STRENGTH, C.STEPS_UNSET,
                                      C.GUIDANCE_UNSET, C.DEFAULT_SEED, C.DEFAULT_FORMAT)


def test_swap_accepts_triton_shaped_tensors(png):
    """What a Python-backend model receives: BYTES as object arrays, scalars as [1] arrays, absent = None."""
    req = validate_swap(
        np.array([png], dtype=object), np.array([[10, 20], [30, 40]], np.float32), np.array([1, 0], np.int32),
        np.array([1, 2, 60, 40], np.float32),
        character=np.array([b"sakura"], dtype=object), prompt=np.array([b"a knight"], dtype=object),
        strength=np.array([0.5], np.float32), steps=np.array([30], np.int32),
        guidance=np.array([5.0], np.float32), seed=np.array([1234], np.int64),
        format=np.array([b"JPG"], dtype=object),
    )
    o = req.options
    assert (o.character, o.prompt, o.strength, o.steps, o.guidance, o.seed, o.format) == (
        "sakura", "a knight", 0.5, 30, 5.0, 1234, "jpeg")
    np.testing.assert_array_equal(req.clicks.box, [1, 2, 60, 40])
    assert req.clicks.box.dtype == np.float32


def test_empty_optional_tensors_mean_defaults(png):
    points, labels = _click()
    req = validate_swap(png, points, labels, np.zeros((0,), np.float32), prompt=np.array([b""], dtype=object),
                        steps=np.zeros((0,), np.int32))
    assert req.clicks.box is None and req.options.prompt is None and req.options.steps == C.STEPS_UNSET


def test_a_box_alone_is_a_prompt(png):
    req = validate_segment(png, np.zeros((0, 2), np.float32), np.zeros((0,), np.int32),
                           np.array([0, 0, W, H]))
    assert req.clicks.points.shape == (0, 2) and req.mask_input is None


def test_segment_mask_input(png):
    points, labels = _click()
    low = C.SAM_LOW_RES_SIZE
    req = validate_segment(png, points, labels, mask_input=np.ones((1, 1, low, low), np.float64))
    assert req.mask_input.dtype == np.float32 and req.mask_input.shape == (1, 1, low, low)
    with pytest.raises(ValueError, match=r"mask_input must be \[1, 1, 256, 256\]"):
        validate_segment(png, points, labels, mask_input=np.ones((1, low, low)))
    bad = np.ones((1, 1, low, low), np.float32)
    bad[0, 0, 3, 4] = np.nan
    with pytest.raises(ValueError, match="mask_input must be finite"):
        validate_segment(png, points, labels, mask_input=bad)


@pytest.mark.parametrize(("points", "labels", "box", "match"), [
    (None, None, None, "at least one positive click"),
    (np.zeros((0, 2)), np.zeros(0), None, "at least one positive click"),
    ([[10, 10]], [0], None, r"at least one positive click .* labels \[0\]"),
    ([[np.nan, 10]], [1], None, "points must be finite but contains nan"),
    ([[np.inf, 10]], [1], None, "points must be finite"),
    ([[10, 10], [20, 20]], [1], None, r"labels must be \[N\] with N = 2"),
    ([[10, 10]], None, None, r"labels must be \[N\] with N = 1"),
    ([[10, 10]], [2], None, "labels must be 0 .* or 1 .* but contains 2"),
    ([[10, 10]], [0.5], None, "but contains 0.5"),
    ([10, 10], [1], None, r"points must be \[N, 2\]"),
    ([[10, 10, 1]], [1], None, r"points must be \[N, 2\]"),
    ([["a", "b"]], [1], None, "points must be numeric"),
    ([[10, 10]] * (C.MAX_POINTS + 1), [1] * (C.MAX_POINTS + 1), None, f"at most {C.MAX_POINTS}"),
    ([[W + 1, 10]], [1], None, rf"points\[0\] = \({W + 1}, 10\) is outside the {W}x{H} image"),
    ([[10, -0.5]], [1], None, "is outside"),
    (None, None, [30, 10, 20, 40], "box must have x0 < x1 and y0 < y1"),
    (None, None, [10, 10, 10, 40], "box must have x0 < x1"),
    (None, None, [0, 0, W, H + 1], "box = .* is outside"),
    (None, None, [0, 0, np.nan, 5], "box must be finite"),
    (None, None, [0, 0, 5], r"box must be \[4\]"),
])
def test_click_refusals(png, points, labels, box, match):
    with pytest.raises(ValueError, match=match):
        validate_swap(png, points, labels, box)
    with pytest.raises(ValueError, match=match):
        validate_clicks(points, labels, box, (H, W))


@pytest.mark.parametrize(("options", "match"), [
    ({"steps": 0}, rf"steps must be in \[1, {C.MAX_STEPS}\] but is 0"),
    ({"steps": C.MAX_STEPS + 1}, f"but is {C.MAX_STEPS + 1}"),
    ({"steps": 2.5}, "steps must be an integer but is 2.5"),
    ({"steps": "10"}, "steps must be an integer"),
    ({"strength": 0.0}, r"strength must be in \(0, 1\] but is 0.0"),
    ({"strength": 1.3}, "but is 1.3"),
    ({"strength": float("nan")}, "strength must be finite"),
    ({"strength": 0.01, "steps": 10}, r"steps \* strength must be >= 1"),
    ({"guidance": 0.5}, rf"guidance must be in \[{C.MIN_GUIDANCE}, {C.MAX_GUIDANCE}\] but is 0.5"),
    ({"guidance": float("nan")}, "guidance must be finite"),
    ({"guidance": C.MAX_GUIDANCE + 0.5}, "guidance must be in"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*63 - 1\] but is -1"),
    ({"format": "gif"}, "format must be one of .* but is 'gif'"),
    ({"prompt": "x" * (C.MAX_PROMPT_CHARS + 1)}, f"at most {C.MAX_PROMPT_CHARS}"),
    ({"prompt": b"\xff\xfe"}, "prompt must be UTF-8"),
    ({"character": "../etc/passwd"}, "character must match"),
    ({"character": np.array([b"a", b"b"], dtype=object)}, "character must be a single value"),
])
def test_option_refusals(png, options, match):
    with pytest.raises(ValueError, match=match):
        validate_options(**options)
    points, labels = _click()
    with pytest.raises(ValueError, match=match):
        validate_swap(png, points, labels, **options)


def test_options_are_checked_before_the_image_is_decoded():
    with pytest.raises(ValueError, match="steps"):
        validate_swap(b"not an image", *_click(), steps=0)


@pytest.mark.parametrize(("image", "match"), [
    (b"", "image is empty"),
    (b"garbage", "not a supported image"),
    (np.array([b"x", b"y"], dtype=object), r"BYTES \[1\]"),
    ("text", "image must be encoded image bytes"),
])
def test_image_refusals(image, match):
    with pytest.raises(ValueError, match=match):
        validate_swap(image, *_click())


def test_limits_at_the_edges_are_accepted(png):
    o = validate_options(strength=1.0, steps=C.MAX_STEPS, guidance=C.MAX_GUIDANCE, seed=2**63 - 1,
                         prompt="x" * C.MAX_PROMPT_CHARS, character="a_b-c.1", format="WEBP")
    assert (o.strength, o.steps, o.format) == (1.0, C.MAX_STEPS, "webp")
    req = validate_swap(png, np.array([[0, 0], [W, H]]), np.array([1, 0]), np.array([0, 0, W, H]))
    assert req.clicks.points.shape == (2, 2)
    assert validate_options(prompt="   ").prompt is None  # blank prompt: the character's own


# -- upscale -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, np.zeros(0, np.int32), 1, np.array([1], np.int32)])
def test_upscale_defaults_to_off(value):
    assert validate_options(upscale=value).upscale == C.DEFAULT_UPSCALE == 1


@pytest.mark.parametrize("factor", [2, 4])
def test_upscale_factors(png, factor):
    assert validate_options(upscale=np.array([factor], np.int32)).upscale == factor
    assert validate_swap(png, *_click(), upscale=factor).options.upscale == factor


@pytest.mark.parametrize(("value", "match"), [
    (3, r"upscale must be one of 1, 2, 4 \(1 = off\) but is 3"),
    (0, "upscale must be one of .* but is 0"),
    (-1, "upscale must be one of .* but is -1"),
    (8, "upscale must be one of .* but is 8"),
    (2.5, "upscale must be an integer but is 2.5"),
    ("2", "upscale must be an integer"),
    (np.array([2, 4], np.int32), r"upscale must be a single value but has shape \(2,\)"),
])
def test_upscale_refusals(png, value, match):
    with pytest.raises(ValueError, match=match):
        validate_options(upscale=value)
    with pytest.raises(ValueError, match=match):
        validate_swap(b"not an image", *_click(), upscale=value)  # before the decode


def test_upscaled_size_limit_names_upscale_the_factor_and_the_size():
    side = int(C.MAX_UPSCALED_PIXELS**0.5)
    check_result_size(validate_options(upscale=4), (side // 4, side // 4))  # exactly the limit
    check_result_size(validate_options(upscale=2), (side // 2, side // 2))
    # no upscale: the photo limits apply, not this one
    check_result_size(validate_options(), (side, side + 1))
    with pytest.raises(ValueError,
                       match=rf"upscale: x4 of a {side // 4}x{side // 4 + 1} \(HxW\) image would be "
                                         rf"{side}x{side + 4} = {side * (side + 4)} pixels, more than the "
                                         r"limit"):
        check_result_size(validate_options(upscale=4), (side // 4, side // 4 + 1))


def test_upscaled_size_limit_in_validate_swap():
    """A photo within the photo limits whose x4 result is not: refused after the decode, naming upscale."""
    side = int(C.MAX_UPSCALED_PIXELS**0.5) // 4
    buf = io.BytesIO()
    Image.new("RGB", (side + 1, side)).save(buf, "PNG")
    with pytest.raises(ValueError, match=rf"upscale: x4 of a {side}x{side + 1} \(HxW\) image"):
        validate_swap(buf.getvalue(), *_click(), upscale=4)
    assert validate_swap(buf.getvalue(), *_click(), upscale=2).options.upscale == 2


@pytest.mark.parametrize(("fmt", "factor", "width", "refused"), [
    ("webp", 4, 4096, True),  # 16384 > 16383
    ("webp", 2, 4096, False),
    ("webp", 1, 16384, True),  # a thin photo, no upscale: webp still cannot hold it
    ("jpeg", 4, 16384, True),  # 65536 > 65500
    ("png", 4, 16384, False),
])
def test_result_side_within_the_encoder(fmt, factor, width, refused):
    options = validate_options(format=fmt, upscale=factor)
    if not refused:
        check_result_size(options, (16, width))
        return
    with pytest.raises(ValueError, match=rf"upscale x{factor} .* format {fmt} holds at most "
                                         rf"{C.ENCODER_MAX_SIDE[fmt]} pixels a side"):
        check_result_size(options, (16, width))


def test_left_out_steps_are_checked_against_the_schedulers_default():
    """A request without steps runs the exported scheduler's: LCM's 4 at strength 0.2 would run no step."""
    options = validate_options(strength=np.array([0.2], np.float32))
    assert options.steps == C.STEPS_UNSET
    left_out = r"but is 4 \* 0.2 \(steps left out: the exported scheduler's default\)"
    with pytest.raises(ValueError, match=left_out):
        check_default_steps(options, C.LCM_STEPS)
    check_default_steps(options, C.DEFAULT_STEPS)  # DPM-Solver++'s 25 * 0.2 = 5 steps
