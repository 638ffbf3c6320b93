"""SAM export: parity with PyTorch, agreement with segment-anything's SamPredictor at three aspect ratios,
architecture detection, and clear errors for wrong or broken checkpoints. Tiny random-weight SAM, CPU."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data
import torch
from PIL import Image

from isekai import constants as C
from isekai.export import sam as sam_export
from isekai.export.common import ort_session
from isekai.export.make_sam import SAM_ENCODERS, build_sam, make_sam_checkpoint
from isekai.export.sam import (
    SAM_DECODER_SPEC,
    SAM_ENCODER_SPEC,
    SAM_MAX_PROMPT_POINTS,
    SamOnnxModel,
    decoder_sample,
    export_sam,
    infer_encoder_config,
    load_sam,
)


def _load_reference():
    """tests/reference_sam.py, wherever pytest put this file's directory on sys.path."""
    path = Path(__file__).resolve().parents[1] / "reference_sam.py"
    spec = importlib.util.spec_from_file_location("reference_sam", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (H, W) of the photo: portrait, landscape, square.
ASPECTS = {"portrait": (1280, 720), "landscape": (720, 1280), "square": (900, 900)}
# Exported and reference logits are the same float32 arithmetic in another order: ~1e-5 apart at most.
LOGIT_ATOL = 1e-4
# Pixels whose logit is within that noise of the threshold may flip; allow one in ten thousand.
MAX_FLIPPED_FRACTION = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint exported once: (checkpoint, repository, parity reports)."""
    root = tmp_path_factory.mktemp("sam")
    checkpoint = make_sam_checkpoint(root / "sam_tiny.pth", model_type="tiny", seed=0)
    reports = export_sam(checkpoint, "auto", repository=root / "repo")
    return checkpoint, root / "repo", reports


@pytest.fixture(scope="module")
def sam(exported):
    return load_sam(exported[0])


@pytest.fixture(scope="module")
def sessions(exported):
    repo = exported[1]
    return (
        ort_session(repo / C.SAM_ENCODER_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME),
        ort_session(repo / C.SAM_DECODER_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME),
    )


@pytest.fixture(scope="module")
def predictor(sam):
    return _load_reference().SamPredictor(sam)


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    sam_export.add_arguments(parser)
    return sam_export.main(parser.parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------------------
# The graphs.
# ---------------------------------------------------------------------------------------------------------
def test_export_writes_both_graphs_with_parity_inside_tolerance(exported):
    _, repo, reports = exported
    assert [r.model for r in reports] == [C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL]
    for model in (C.SAM_ENCODER_MODEL, C.SAM_DECODER_MODEL):
        assert (repo / model / C.MODEL_VERSION / C.ONNX_FILENAME).is_file()
    for report in reports:
        print(report)  # the measured figures, shown with -s
        assert set(report.max_abs) == set(
            SAM_ENCODER_SPEC.outputs if report.model == C.SAM_ENCODER_MODEL else SAM_DECODER_SPEC.outputs
        )
        assert report.worst() < 1e-4


@pytest.mark.parametrize("spec", [SAM_ENCODER_SPEC, SAM_DECODER_SPEC], ids=lambda s: s.model)
def test_graph_names_and_dims_follow_the_spec(exported, spec):
    graph = onnx.load(str(exported[1] / spec.model / C.MODEL_VERSION / C.ONNX_FILENAME)).graph

    def dims(values):
        return {
            v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim) for v in values
        }

    assert dims(graph.input) == dict(spec.inputs)
    assert dims(graph.output) == dict(spec.outputs)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*graph.input, *graph.output])


def test_encoder_graph_never_holds_a_whole_score_matrix(exported):
    """The global attention is exported in blocks of query rows: no loop operator, and no intermediate as big
    as one head's 4096 x 4096 scores times the heads (what segment-anything's own attention exports)."""
    path = exported[1] / C.SAM_ENCODER_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    assert not {n.op_type for n in graph.node} & {"Loop", "Scan", "If"}
    sizes = [int(np.prod([d.dim_value for d in v.type.tensor_type.shape.dim])) for v in graph.value_info]
    heads, tokens = SAM_ENCODERS["tiny"].num_heads, C.SAM_EMBEDDING_SIZE**2
    block = heads * (C.SAM_ATTENTION_QUERY_ROWS * C.SAM_EMBEDDING_SIZE) * tokens
    assert max(sizes) == block, f"largest intermediate {max(sizes)} elements; one block of scores is {block}"
    assert max(sizes) * C.SAM_EMBEDDING_SIZE // C.SAM_ATTENTION_QUERY_ROWS == heads * tokens * tokens


@pytest.mark.parametrize("n_points", [1, 4, SAM_MAX_PROMPT_POINTS])
def test_decoder_follows_point_count(sam, sessions, n_points):
    labels = tuple(float(i % 2) for i in range(n_points))  # alternating background/foreground clicks
    feeds = decoder_sample((600, 800), labels, seed=n_points)
    got = sessions[1].run(SAM_DECODER_SPEC.output_names, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        want = SamOnnxModel(sam, return_single_mask=True)(*feeds.values())
    for name, g, w in zip(SAM_DECODER_SPEC.output_names, got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=LOGIT_ATOL, rtol=0, err_msg=name)


def _photo(height: int, width: int) -> np.ndarray:
    """skimage's astronaut, HxWx3 uint8 RGB, stretched to the aspect ratio under test."""
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BILINEAR))


@pytest.mark.parametrize("aspect", list(ASPECTS))
def test_exported_sam_matches_sam_predictor(sam, sessions, predictor, aspect):
    h, w = ASPECTS[aspect]
    photo = _photo(h, w)
    predictor.set_image(photo)
    encoder, decoder = sessions

    # Encoder on the same preprocessed photo SamPredictor fed its model.
    resized = predictor.transform.apply_image(photo)
    image = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())
    (embedding,) = encoder.run(None, {C.SAM_ENC_IN_IMAGE: image.numpy()})
    np.testing.assert_allclose(embedding, predictor.features.numpy(), atol=LOGIT_ATOL, rtol=0)

    # One click, as the official ONNX example sends it: the click plus a padding point (0, 0) labelled -1.
    click = np.array([[0.45 * w, 0.4 * h]])
    masks, scores, low_res = predictor.predict(
        point_coords=click, point_labels=np.array([1]), multimask_output=True, return_logits=True
    )
    best = int(np.argmax(scores))
    coords = np.concatenate([predictor.transform.apply_coords(click, (h, w)), [[0.0, 0.0]]])
    feeds = {
        C.SAM_DEC_IN_EMBEDDINGS: predictor.features.numpy(),
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
    print(f"{aspect} {h}x{w}: {flipped:.2e} of pixels differ, iou {got_iou[0, 0]:.6f} vs {scores[best]:.6f}")
    assert flipped <= MAX_FLIPPED_FRACTION
    np.testing.assert_allclose(got_masks[0, 0], masks[best], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(got_iou[0, 0], scores[best], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_low_res[0, 0], low_res[best], atol=LOGIT_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: architecture detection and errors.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(SAM_ENCODERS))
def test_auto_detects_every_architecture(model_type):
    with torch.device("meta"):  # shapes only: full-size encoders without allocating their weights
        state = build_sam(model_type).state_dict()
    assert infer_encoder_config(state) == SAM_ENCODERS[model_type]


def test_explicit_matching_type_loads_and_seed_fixes_the_weights(exported, tmp_path):
    checkpoint = exported[0]
    loaded = load_sam(checkpoint, "tiny")
    original = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.items())
    again = torch.load(make_sam_checkpoint(tmp_path / "again.pth", "tiny", seed=0), weights_only=True)
    other = torch.load(make_sam_checkpoint(tmp_path / "other.pth", "tiny", seed=1), weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in original.items())
    assert not all(torch.equal(other[k], v) for k, v in original.items())


def test_wrong_model_type_is_a_clear_error(exported, tmp_path, capsys):
    code = _run_cli("--checkpoint", str(exported[0]), "--model-type", "vit_h", "--repository", str(tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    assert "sam_tiny.pth is a tiny checkpoint (embed dim 64, 2 blocks)" in err
    assert "--model-type vit_h" in err and "embed dim 1280, 32 blocks" in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing is written when the checkpoint is refused"


def _corrupt(path: Path, source: Path) -> None:
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])


def _not_a_checkpoint(path: Path, source: Path) -> None:
    path.write_bytes(b"this is a JPEG, honest\n" * 10)


def _other_model(path: Path, source: Path) -> None:
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)


def _objects_not_tensors(path: Path, source: Path) -> None:
    torch.save({"model": argparse.Namespace(weights=1)}, path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_corrupt, "is not a readable PyTorch checkpoint"),
        (_not_a_checkpoint, "is not a readable PyTorch checkpoint"),
        (_other_model, "is not a SAM checkpoint: no image_encoder.patch_embed.proj.weight"),
        (_objects_not_tensors, "is not a readable PyTorch checkpoint"),
    ],
    ids=["truncated", "not-a-checkpoint", "other-model", "pickled-objects"],
)
def test_broken_checkpoints_are_clear_errors(exported, tmp_path, capsys, make, message):
    bad = tmp_path / "broken.pth"
    make(bad, exported[0])
    code = _run_cli("--checkpoint", str(bad), "--repository", str(tmp_path / "repo"))
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad) in err and message in err
    assert "Traceback" not in err


def test_missing_checkpoint_and_missing_destination_are_clear_errors(exported, tmp_path, capsys):
    assert _run_cli("--checkpoint", str(tmp_path / "nope.pth"), "--repository", str(tmp_path)) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err
    assert _run_cli("--checkpoint", str(exported[0]), "--encoder-output", str(tmp_path / "e.onnx")) == 2
    assert "--decoder-output" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# torchvision stays out.
# ---------------------------------------------------------------------------------------------------------
def test_exporter_imports_without_torchvision():
    """In a fresh interpreter where torchvision cannot be imported, the exporter imports and never tries."""
    script = """
import importlib.abc, sys
tried = []
class NoTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            tried.append(name)
            raise ImportError("torchvision is blocked in this test")
sys.meta_path.insert(0, NoTorchvision())
import isekai.export.sam
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torchvision")
assert not loaded, loaded
print("segment_anything.modeling" in sys.modules, "segment_anything.predictor" in sys.modules, tried)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # The model code is there, the torchvision-importing predictor is not, and nobody even tried torchvision.
    assert result.stdout.split() == ["True", "False", "[]"], result.stdout
