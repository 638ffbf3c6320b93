"""MobileSAM (vit_t) export: our TinyViT against MobileSAM's own code, the checkpoint format, architecture
detection, onnxruntime parity, and the exported graphs against MobileSAM's ``SamPredictor`` at three aspect
ratios.

The reference is the PyPI package ``mobilesam-mirror`` (import name ``mobile_sam``), loaded by
tests/reference_mobile_sam.py with stand-ins for the few timm/torchvision names it imports; its tests skip
with the install command when it is absent. Exports use the test-size ``tiny_t`` TinyViT; the full-size vit_t
is checked in PyTorch (a forward pass, ~2 s) and through its checkpoint format.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from isekai import constants as C
from isekai.export import sam as sam_export
from isekai.export.common import ort_session
from isekai.export.make_sam import SAM_ENCODERS, make_sam_checkpoint
from isekai.export.sam import SAM_DECODER_SPEC, infer_encoder_config, load_sam, read_state_dict
from isekai.export.tinyvit import TinyViT
from tests.export.test_sam_export import ASPECTS, LOGIT_ATOL, MAX_FLIPPED_FRACTION, _photo

REFERENCE_PATH = Path(__file__).resolve().parents[1] / "reference_mobile_sam.py"
# Our TinyViT runs the same float32 operations in the same order as MobileSAM's: measured 0.0.
SAME_CODE_ATOL = 1e-5


def _reference():
    spec = importlib.util.spec_from_file_location("reference_mobile_sam", REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mobile_sam():
    reference = _reference()
    try:
        reference.load()
    except ImportError as err:
        pytest.skip(f"MobileSAM's reference code is absent: {err}")
    return reference


def _run_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    sam_export.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = sam_export.main(parser.parse_args(list(argv)))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def vit_t_checkpoint(tmp_path_factory) -> Path:
    """A full-size random-weight vit_t in the official format (6 M parameters, written in ~1 s)."""
    return make_sam_checkpoint(tmp_path_factory.mktemp("vit_t") / "mobile_sam.pt", "vit_t", seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A test-size TinyViT SAM exported through the command line: (checkpoint, repository, stdout)."""
    root = tmp_path_factory.mktemp("tiny_t")
    checkpoint = make_sam_checkpoint(root / "mobile_sam_tiny.pt", "tiny_t", seed=0)
    code, out = _run_cli(
        "--checkpoint", str(checkpoint), "--model-type", "auto", "--repository", str(root / "repo")
    )
    assert code == 0, out
    return checkpoint, root / "repo", out


# ---------------------------------------------------------------------------------------------------------
# The checkpoint format and architecture detection.
# ---------------------------------------------------------------------------------------------------------
def test_auto_recognises_vit_t_from_the_keys(vit_t_checkpoint):
    state = read_state_dict(vit_t_checkpoint)
    assert "image_encoder.patch_embed.proj.weight" not in state  # no ViT keys: TinyViT's
    assert infer_encoder_config(state, vit_t_checkpoint.name) == SAM_ENCODERS["vit_t"]
    sam = load_sam(vit_t_checkpoint, "auto")
    assert isinstance(sam.image_encoder, TinyViT)
    assert sum(p.numel() for p in sam.image_encoder.parameters()) == pytest.approx(6.07e6, rel=0.01)
    assert load_sam(vit_t_checkpoint, "vit_t").image_encoder.config == SAM_ENCODERS["vit_t"]


def test_vit_t_given_for_a_vit_checkpoint_is_a_clear_error(vit_t_checkpoint, tmp_path, capsys):
    vit = make_sam_checkpoint(tmp_path / "sam_tiny.pth", "tiny")
    code, _ = _run_cli("--checkpoint", str(vit), "--model-type", "vit_t", "--repository", str(tmp_path / "r"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "sam_tiny.pth is a tiny checkpoint (embed dim 64, 2 blocks) but --model-type vit_t" in err
    assert "TinyViT dims [64, 128, 160, 320], depths [2, 2, 6, 2]" in err
    code, _ = _run_cli(
        "--checkpoint", str(vit_t_checkpoint), "--model-type", "vit_b", "--repository", str(tmp_path / "r")
    )
    assert code == 2 and "mobile_sam.pt is a vit_t checkpoint (TinyViT dims" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "nothing is written when the checkpoint is refused"


def test_broken_tinyvit_checkpoint_is_a_clear_error(vit_t_checkpoint, tmp_path, capsys):
    state = read_state_dict(vit_t_checkpoint)
    state.pop("image_encoder.layers.2.blocks.0.attn.attention_biases")
    bad = tmp_path / "broken.pt"
    torch.save(state, bad)
    code, _ = _run_cli("--checkpoint", str(bad), "--repository", str(tmp_path / "r"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "broken.pt: a MobileSAM (TinyViT) checkpoint that does not fit" in err
    assert "image_encoder.layers.2.blocks.0.attn.attention_biases is missing" in err


def test_our_checkpoint_loads_into_mobile_sam_strictly(mobile_sam, vit_t_checkpoint):
    """make_sam's vit_t file has exactly the official keys and shapes: MobileSAM's own builder loads it."""
    model = mobile_sam.load().sam_model_registry["vit_t"]()
    model.load_state_dict(torch.load(vit_t_checkpoint, weights_only=True), strict=True)


# ---------------------------------------------------------------------------------------------------------
# Our TinyViT against MobileSAM's.
# ---------------------------------------------------------------------------------------------------------
def test_full_size_tinyvit_matches_mobile_sam(mobile_sam, vit_t_checkpoint):
    ours = load_sam(vit_t_checkpoint).image_encoder
    theirs = mobile_sam.predictor(torch.load(vit_t_checkpoint, weights_only=True)).model.image_encoder
    image = (
        torch.rand(1, 3, C.SAM_IMAGE_SIZE, C.SAM_IMAGE_SIZE, generator=torch.Generator().manual_seed(3)) * 4.9
        - 2.2
    )
    with torch.no_grad():
        got, want = ours(image), theirs(image)
    assert (
        got.shape == want.shape == (1, C.SAM_EMBEDDING_CHANNELS, C.SAM_EMBEDDING_SIZE, C.SAM_EMBEDDING_SIZE)
    )
    diff = (got - want).abs().max().item()
    print(f"vit_t TinyViT vs MobileSAM: max |diff| {diff:.2e} (|embedding| <= {want.abs().max().item():.2f})")
    assert diff <= SAME_CODE_ATOL


# ---------------------------------------------------------------------------------------------------------
# The exported graphs.
# ---------------------------------------------------------------------------------------------------------
def test_export_parity_and_interface(exported):
    _, repo, out = exported
    lines = [line for line in out.splitlines() if line.startswith("parity")]
    assert [line.split(":")[0] for line in lines] == [
        f"parity {C.SAM_ENCODER_MODEL}",
        f"parity {C.SAM_DECODER_MODEL}",
    ]
    print("\n".join(lines))
    encoder = ort_session(repo / C.SAM_ENCODER_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME)
    # The same interface as every SAM encoder, so nothing downstream changes.
    assert [(i.name, i.shape) for i in encoder.get_inputs()] == [(C.SAM_ENC_IN_IMAGE, [1, 3, 1024, 1024])]
    assert [(o.name, o.shape) for o in encoder.get_outputs()] == [
        (C.SAM_ENC_OUT_EMBEDDINGS, [1, 256, 64, 64])
    ]


@pytest.fixture(scope="module")
def reference_predictor(mobile_sam, exported):
    """MobileSAM's SamPredictor on MobileSAM's own Sam whose TinyViT has the test size (tiny_t): MobileSAM's
    build_sam_vit_t, its encoder replaced by MobileSAM's TinyViT class at tiny_t's widths."""
    package = mobile_sam.load()
    config = SAM_ENCODERS["tiny_t"]
    model = package.sam_model_registry["vit_t"]()
    model.image_encoder = package.modeling.TinyViT(
        img_size=C.SAM_IMAGE_SIZE,
        in_chans=3,
        num_classes=config.num_classes,
        embed_dims=list(config.embed_dims),
        depths=list(config.depths),
        # MobileSAM's lists also name the conv stage, which ignores its entries.
        num_heads=[1, *config.num_heads],
        window_sizes=[7, *config.window_sizes],
        mlp_ratio=config.mlp_ratio,
        drop_rate=0.0,
        drop_path_rate=0.0,
        mbconv_expand_ratio=config.mbconv_expand_ratio,
        local_conv_size=config.local_conv_size,
    )
    model.load_state_dict(torch.load(exported[0], weights_only=True), strict=True)
    return package.SamPredictor(model.eval())  # eval() after loading: MobileSAM caches its biases on eval()


@pytest.fixture(scope="module")
def sessions(exported):
    repo = exported[1]
    return tuple(
        ort_session(repo / m / C.MODEL_VERSION / C.ONNX_FILENAME)
        for m in (C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL)
    )


@pytest.mark.parametrize("aspect", list(ASPECTS))
def test_exported_vit_t_matches_mobile_sam_predictor(reference_predictor, sessions, aspect):
    predictor = reference_predictor
    h, w = ASPECTS[aspect]
    photo = _photo(h, w)
    predictor.set_image(photo)
    encoder, decoder = sessions

    resized = predictor.transform.apply_image(photo)
    image = predictor.model.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())
    (embedding,) = encoder.run(None, {C.SAM_ENC_IN_IMAGE: image.numpy()})
    np.testing.assert_allclose(embedding, predictor.features.numpy(), atol=LOGIT_ATOL, rtol=0)

    click = np.array([[0.45 * w, 0.4 * h]])
    masks, scores, low_res = predictor.predict(
        point_coords=click, point_labels=np.array([1]), multimask_output=True, return_logits=True
    )
    best = int(np.argmax(scores))
    coords = np.concatenate([predictor.transform.apply_coords(click, (h, w)), [[0.0, 0.0]]])
    feeds = {
        C.SAM_DEC_IN_EMBEDDINGS: embedding,  # the exported encoder's own output: the whole exported chain
        C.SAM_DEC_IN_POINT_COORDS: coords[None].astype(np.float32),
        C.SAM_DEC_IN_POINT_LABELS: np.array([[1, -1]], np.float32),
        C.SAM_DEC_IN_MASK_INPUT: np.zeros((1, 1, C.SAM_LOW_RES_SIZE, C.SAM_LOW_RES_SIZE), np.float32),
        C.SAM_DEC_IN_HAS_MASK_INPUT: np.zeros(1, np.float32),
        C.SAM_DEC_IN_ORIG_IM_SIZE: np.array([h, w], np.float32),
    }
    got_masks, got_iou, got_low_res = decoder.run(SAM_DECODER_SPEC.output_names, feeds)

    assert got_masks.shape == (1, 1, h, w)
    want = masks[best] > C.SAM_MASK_THRESHOLD
    got = got_masks[0, 0] > C.SAM_MASK_THRESHOLD
    assert 0.01 < want.mean() < 0.99, "reference mask is all one value: the comparison would prove nothing"
    flipped = float((got != want).mean())
    embed_diff = float(np.abs(embedding - predictor.features.numpy()).max())
    print(
        f"{aspect} {h}x{w}: embedding max |diff| {embed_diff:.2e}, {flipped:.2e} of pixels differ, "
        f"iou {got_iou[0, 0]:.6f} vs {scores[best]:.6f}"
    )
    assert flipped <= MAX_FLIPPED_FRACTION
    np.testing.assert_allclose(got_masks[0, 0], masks[best], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(got_iou[0, 0], scores[best], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_low_res[0, 0], low_res[best], atol=LOGIT_ATOL, rtol=0)
