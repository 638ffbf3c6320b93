"""SAM geometry: parity with segment-anything's own code at several aspect ratios, and the decoder feed
contract.

The reference functions come from the installed segment-anything 1.0 (torch only; its torchvision-importing
``utils/transforms.py`` is loaded with a stub that refuses to be called, since only the coordinate maths is
compared).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from isekai import constants as C
from isekai.ensemble.sam_transforms import SamTransform

torch = pytest.importorskip("torch")

# (H, W): portrait, landscape, square, tiny, odd and extreme ratios.
SIZES = [(1080, 720), (480, 640), (512, 512), (16, 16), (17, 1000), (3000, 31), (4096, 4096), (333, 777)]


@pytest.fixture(scope="module")
def reference():
    """segment-anything's ResizeLongestSide, Sam.preprocess and SamOnnxModel, imported without torchvision."""
    from isekai.export.sam_import import Sam, SamOnnxModel  # noqa: PLC0415 - after the torch importorskip

    def refuse(*args, **kwargs):
        raise AssertionError("torchvision stub called: only coordinate maths is compared")

    stub = types.ModuleType("torchvision.transforms.functional")
    stub.resize = stub.to_pil_image = refuse
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms", stub.__name__)}
    sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                        "torchvision.transforms": types.ModuleType("torchvision.transforms"),
                        stub.__name__: stub})
    try:
        path = (
            importlib.util.find_spec("segment_anything").submodule_search_locations[0]
            + "/utils/transforms.py"
        )
        spec = importlib.util.spec_from_file_location("_sam_reference_transforms", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return SimpleNamespace(resize=module.ResizeLongestSide(C.SAM_IMAGE_SIZE), Sam=Sam,
                           SamOnnxModel=SamOnnxModel)


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_preprocess_shape_matches_segment_anything(reference, h, w):
    ours = SamTransform.get_preprocess_shape(h, w, C.SAM_IMAGE_SIZE)
    assert ours == reference.resize.get_preprocess_shape(h, w, C.SAM_IMAGE_SIZE)
    onnx_side = reference.SamOnnxModel.resize_longest_image_size(torch.tensor([h, w], dtype=torch.float32),
                                                                  C.SAM_IMAGE_SIZE)
    assert ours == tuple(int(v) for v in onnx_side)  # what the ONNX decoder crops before its final resize
    assert max(ours) == C.SAM_IMAGE_SIZE


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_coords_and_boxes_match_segment_anything_and_round_trip(reference, h, w):
    t = SamTransform()
    rng = np.random.default_rng(h * 7 + w)
    xy = rng.uniform(0, 1, size=(5, 2)) * (w, h)
    np.testing.assert_allclose(t.apply_coords(xy, (h, w)), reference.resize.apply_coords(xy, (h, w)),
                               rtol=1e-12)
    boxes = np.sort(rng.uniform(0, 1, size=(3, 2, 2)) * (w, h), axis=1).reshape(3, 4)
    np.testing.assert_allclose(t.apply_boxes(boxes, (h, w)), reference.resize.apply_boxes(boxes, (h, w)))
    np.testing.assert_allclose(t.restore_coords(t.apply_coords(xy, (h, w)), (h, w)), xy, rtol=1e-12)
    # the image's far corner lands on the content edge
    corner = t.apply_coords(np.array([w, h], float), (h, w))
    np.testing.assert_allclose(corner, t.input_size((h, w))[::-1])


@pytest.mark.parametrize(("h", "w"), [(40, 24), (24, 40), (32, 32), (16, 20)])
def test_encoder_input_matches_sam_preprocess(reference, h, w):
    t = SamTransform()
    rgb = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    resized = t.apply_image(rgb)
    assert resized.shape[:2] == t.input_size((h, w)) and resized.dtype == np.uint8
    fake_sam = SimpleNamespace(
        pixel_mean=torch.tensor(C.SAM_PIXEL_MEAN).view(-1, 1, 1),
        pixel_std=torch.tensor(C.SAM_PIXEL_STD).view(-1, 1, 1),
        image_encoder=SimpleNamespace(img_size=C.SAM_IMAGE_SIZE),
    )
    expected = reference.Sam.preprocess(fake_sam, torch.as_tensor(resized).permute(2, 0, 1)[None].float())
    ours = t.encoder_input(rgb)
    assert ours.shape == (1, 3, C.SAM_IMAGE_SIZE, C.SAM_IMAGE_SIZE) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)


def test_apply_image_keeps_content_in_place():
    rgb = np.zeros((300, 100, 3), np.uint8)
    rgb[:, 50:] = 255  # right half white
    out = SamTransform().apply_image(rgb)
    assert out.shape == (1024, 341, 3)
    col = np.flatnonzero(out[512, :, 0] > 127)[0]
    assert abs(col - 50 * 1024 / 300) <= 1


@pytest.mark.parametrize(("h", "w"), [(1080, 720), (480, 640)])
def test_decoder_prompt_follows_the_onnx_example(h, w):
    t = SamTransform()
    points = np.array([[100.0, 200.0], [300.0, 50.0]])
    labels = np.array([1, 0])
    coords, lbl = t.decoder_prompt(points, labels, None, (h, w))
    assert coords.dtype == lbl.dtype == np.float32 and coords.shape == (1, 3, 2) and lbl.shape == (1, 3)
    np.testing.assert_allclose(coords[0, :2], t.apply_coords(points, (h, w)), rtol=1e-6)
    np.testing.assert_array_equal(coords[0, 2], [0, 0])
    np.testing.assert_array_equal(lbl[0], [1, 0, -1])

    box = np.array([10.0, 20.0, 400.0, 460.0])
    coords, lbl = t.decoder_prompt(points[:1], labels[:1], box, (h, w))
    assert coords.shape == (1, 3, 2)
    np.testing.assert_allclose(coords[0, 1:], t.apply_coords(box.reshape(2, 2), (h, w)), rtol=1e-6)
    np.testing.assert_array_equal(lbl[0], [1, 2, 3])

    # a box alone: no padding point
    coords, lbl = t.decoder_prompt(np.zeros((0, 2)), np.zeros(0), box, (h, w))
    np.testing.assert_array_equal(lbl[0], [2, 3])


def test_decoder_prompt_refusals():
    t = SamTransform()
    with pytest.raises(ValueError, match="same length"):
        t.decoder_prompt(np.zeros((2, 2)), np.ones(3), None, (100, 100))
    with pytest.raises(ValueError, match="at least one point or a box"):
        t.decoder_prompt(None, None, None, (100, 100))


def test_decoder_inputs_feed():
    t = SamTransform()
    h, w = 900, 600  # portrait: orig_im_size must read (H, W)
    feed = t.decoder_inputs(np.array([[10.0, 20.0]]), np.array([1]), None, (h, w))
    assert set(feed) == {C.SAM_DEC_IN_POINT_COORDS, C.SAM_DEC_IN_POINT_LABELS, C.SAM_DEC_IN_MASK_INPUT,
                         C.SAM_DEC_IN_HAS_MASK_INPUT, C.SAM_DEC_IN_ORIG_IM_SIZE}
    assert all(v.dtype == np.float32 for v in feed.values())
    np.testing.assert_array_equal(feed[C.SAM_DEC_IN_ORIG_IM_SIZE], [h, w])
    assert feed[C.SAM_DEC_IN_MASK_INPUT].shape == (1, 1, C.SAM_LOW_RES_SIZE, C.SAM_LOW_RES_SIZE)
    assert not feed[C.SAM_DEC_IN_MASK_INPUT].any() and feed[C.SAM_DEC_IN_HAS_MASK_INPUT].tolist() == [0.0]

    previous = np.full((1, 1, C.SAM_LOW_RES_SIZE, C.SAM_LOW_RES_SIZE), 2.5, np.float64)
    embeddings = np.zeros((1, C.SAM_EMBEDDING_CHANNELS, C.SAM_EMBEDDING_SIZE, C.SAM_EMBEDDING_SIZE),
                          np.float32)
    feed = t.decoder_inputs(np.array([[10.0, 20.0]]), np.array([1]), None, (h, w), mask_input=previous,
                            embeddings=embeddings)
    assert feed[C.SAM_DEC_IN_HAS_MASK_INPUT].tolist() == [1.0]
    assert feed[C.SAM_DEC_IN_MASK_INPUT].dtype == np.float32 and (feed[C.SAM_DEC_IN_MASK_INPUT] == 2.5).all()
    assert feed[C.SAM_DEC_IN_EMBEDDINGS] is not None
    with pytest.raises(ValueError, match="mask_input must be"):
        t.decoder_inputs(np.array([[1.0, 1.0]]), np.array([1]), None, (h, w),
                         mask_input=np.zeros((1, 256, 256)))


@pytest.mark.parametrize(("h", "w"), [(1080, 720), (480, 640), (300, 300), (50, 1000)])
def test_a_click_comes_back_at_its_pixel_through_the_decoders_postprocessing(reference, h, w):
    """The whole geometry loop: a click mapped into the 1024 frame, a low-res mask blob drawn there (as the
    decoder would), and segment-anything's own ONNX mask post-processing fed our orig_im_size. The blob must
    land on the clicked pixel of the original image (a swapped (H, W) or a skipped apply_coords would
    miss)."""
    t = SamTransform()
    click = np.array([[0.3 * w, 0.7 * h]])
    feed = t.decoder_inputs(click, np.array([1]), None, (h, w))
    x1024, y1024 = feed[C.SAM_DEC_IN_POINT_COORDS][0, 0]
    low = C.SAM_LOW_RES_SIZE
    yy, xx = np.mgrid[0:low, 0:low] + 0.5
    scale = low / C.SAM_IMAGE_SIZE
    blob = 4.0 - np.hypot(xx - x1024 * scale, yy - y1024 * scale)  # positive within 4 low-res pixels
    fake = SimpleNamespace(img_size=C.SAM_IMAGE_SIZE,
                           resize_longest_image_size=reference.SamOnnxModel.resize_longest_image_size)
    masks = reference.SamOnnxModel.mask_postprocessing(
        fake, torch.as_tensor(blob, dtype=torch.float32)[None, None],
        torch.as_tensor(feed[C.SAM_DEC_IN_ORIG_IM_SIZE]))
    assert tuple(masks.shape[-2:]) == (h, w)
    positive = masks[0, 0].numpy() > 0
    assert positive[int(click[0, 1]), int(click[0, 0])]
    ys, xs = np.nonzero(positive)
    assert (abs(xs.mean() + 0.5 - click[0, 0]) <= max(2.0, w / 256)
            and abs(ys.mean() + 0.5 - click[0, 1]) <= max(2.0, h / 256))
