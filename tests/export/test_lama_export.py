"""LaMa export: checkpoint loader, config reader, the DFT, and onnxruntime parity of the exported graph.

A small random-weight big-lama-style folder (config.yaml + Lightning best.ckpt) is made once per module.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from isekai import constants as C
from isekai.export import lama
from isekai.export.common import ort_session
from isekai.export.ffc import FFCResnetBlock, generator_from_config, irfft2_matmul, rfft2_matmul
from isekai.export.make_lama import make_lama_checkpoint

NGF, N_BLOCKS = 8, 2


@pytest.fixture(scope="module")
def lama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lama") / "big-lama"
    make_lama_checkpoint(folder, ngf=NGF, n_blocks=N_BLOCKS)
    return folder


def paths(folder: Path) -> tuple[Path, Path]:
    return folder / "models" / "best.ckpt", folder / "config.yaml"


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    lama.add_arguments(parser)
    return lama.main(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def exported(lama_dir: Path, tmp_path_factory) -> Path:
    """The small checkpoint exported through the command line (default --fft matmul)."""
    ckpt, config = paths(lama_dir)
    out = tmp_path_factory.mktemp("onnx") / "lama.onnx"
    assert run_cli("--checkpoint", str(ckpt), "--config", str(config), "--output", str(out)) == 0
    return out


def run_graph(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort_session(path)
    return session.run([C.LAMA_OUT_INPAINTED], {k: v.numpy() for k, v in inputs.items()})[0]


# ---------------------------------------------------------------------------------------------------------
# The exported graph.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 96), (128, 72)])
def test_graph_matches_generator_composite(exported: Path, lama_dir: Path, size: tuple[int, int]):
    ckpt, config = paths(lama_dir)
    generator = lama.load_lama_checkpoint(ckpt, config)
    inputs = lama.lama_inputs(*size, seed=7)
    image, mask = inputs[C.LAMA_IN_IMAGE], inputs[C.LAMA_IN_MASK]
    got = run_graph(exported, inputs)

    # The documented formula, computed from the generator itself rather than through the export wrapper.
    hole = (mask > 0).float()
    with torch.no_grad():
        prediction = generator(torch.cat([image * (1 - hole), hole], dim=1)).clamp(0, 1)
    want = (hole * prediction + (1 - hole) * image).numpy()
    assert got.shape == (1, 3, *size)
    np.testing.assert_allclose(got, want, atol=lama.PARITY_ATOL, rtol=0)

    keep = np.broadcast_to(hole.numpy() == 0, got.shape)
    np.testing.assert_array_equal(got[keep], image.numpy()[keep])  # outside the hole: the image, bit for bit
    assert np.abs(got - image.numpy())[~keep].mean() > 0.05  # inside: the generator's own prediction
    assert got.min() >= 0.0 and got.max() <= 1.0


def test_mask_is_binarized(exported: Path):
    inputs = lama.lama_inputs(64, 64, seed=3)
    mask = inputs[C.LAMA_IN_MASK]
    rescaled = dict(inputs, **{C.LAMA_IN_MASK: torch.where(mask > 0, mask * 0.01 + 5.0, mask - 3.0)})
    np.testing.assert_array_equal(run_graph(exported, inputs), run_graph(exported, rescaled))


def test_graph_names_and_dynamic_axes(exported: Path):
    graph = onnx.load(str(exported)).graph
    assert [i.name for i in graph.input] == lama.LAMA_SPEC.input_names == [C.LAMA_IN_IMAGE, C.LAMA_IN_MASK]
    assert [o.name for o in graph.output] == lama.LAMA_SPEC.output_names == [C.LAMA_OUT_INPAINTED]
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_value == 1
        assert all(d.dim_param for d in dims[2:]), f"{value.name}: H, W must be dynamic, got {dims}"


def test_onnx_dft_variant_matches(lama_dir: Path, tmp_path: Path):
    ckpt, config = paths(lama_dir)
    out = tmp_path / "lama_dft.onnx"
    report = lama.export_lama(ckpt, config, output=out, fft="onnx")
    assert report.worst() <= lama.PARITY_ATOL
    node_types = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "DFT" in node_types


def test_matmul_variant_has_no_dft(exported: Path):
    node_types = {n.op_type for n in onnx.load(str(exported)).graph.node}
    assert "DFT" not in node_types and "MatMul" in node_types


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 9, 16), (1, 2, 6, 7), (1, 1, 1, 5)])
def test_matmul_dft_equals_torch_fft(shape: tuple[int, ...]):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    spectrum = torch.fft.rfftn(x, dim=(-2, -1), norm="ortho")
    ours = rfft2_matmul(x)
    torch.testing.assert_close(ours[:, :, 0], spectrum.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[:, :, 1], spectrum.imag, atol=1e-5, rtol=0)
    # An arbitrary half spectrum (imaginary DC/Nyquist parts included): the inverse drops what torch drops.
    z = torch.randn((*shape[:2], 2, shape[2], shape[3] // 2 + 1), generator=torch.Generator().manual_seed(1))
    want = torch.fft.irfftn(torch.complex(z[:, :, 0], z[:, :, 1]), s=shape[-2:], dim=(-2, -1), norm="ortho")
    torch.testing.assert_close(irfft2_matmul(z, shape[-1]), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The checkpoint.
# ---------------------------------------------------------------------------------------------------------
def test_lightning_checkpoint_needs_the_safe_loader(lama_dir: Path):
    ckpt, config = paths(lama_dir)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)  # the OmegaConf hyper-parameters, as with the real best.ckpt

    checkpoint = lama.read_checkpoint(ckpt)
    keys = list(checkpoint["state_dict"])
    assert any(k.startswith("discriminator.") for k in keys) and any(k.startswith("loss_") for k in keys)
    # The foreign objects are husks, not omegaconf objects.
    assert isinstance(checkpoint["hyper_parameters"]["config"], lama._Untrusted)

    generator = lama.load_lama_checkpoint(ckpt, config)
    assert not generator.training
    prefix = "generator."
    want = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    got = generator.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_legacy_format_and_plain_values_load(tmp_path: Path):
    """torch.save's pre-1.6 format, and the builtins protocol 2 writes under Python 2 names, come through."""
    state = {"generator.w": torch.randn(2, 3), "generator.n": torch.tensor(5)}
    extra = {"set": {1, 2}, "bytes": b"\x00\xff", "dtype": torch.float16, "ordered": OrderedDict(a=1)}
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": state, **extra}, path, _use_new_zipfile_serialization=False)
    loaded = lama.read_checkpoint(path)
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state.items())
    assert {k: loaded[k] for k in extra} == extra


class _RunsCommand:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_foreign_code_in_a_checkpoint_is_not_run(lama_dir: Path, tmp_path: Path):
    ckpt, config = paths(lama_dir)
    marker = tmp_path / "ran"
    checkpoint = {"state_dict": lama.read_checkpoint(ckpt)["state_dict"]}
    checkpoint["callbacks"] = {"evil": _RunsCommand(f"touch {marker}")}
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile)

    loaded = lama.read_checkpoint(hostile)
    assert not marker.exists()
    assert isinstance(loaded["callbacks"]["evil"], lama._Untrusted)
    assert lama.load_lama_checkpoint(hostile, config) is not None  # the generator still loads


def test_key_mismatch_names_the_file_and_keys(lama_dir: Path, tmp_path: Path):
    ckpt, _ = paths(lama_dir)
    _, deeper_config = make_lama_checkpoint(tmp_path / "deeper", ngf=NGF, n_blocks=N_BLOCKS + 1)
    with pytest.raises(ValueError, match="missing keys") as info:
        lama.load_lama_checkpoint(ckpt, deeper_config)
    assert str(ckpt) in str(info.value)
    assert f"model.{5 + N_BLOCKS}.conv1" in str(info.value)  # the first block the checkpoint lacks

    _, wider_config = make_lama_checkpoint(tmp_path / "wider", ngf=2 * NGF, n_blocks=N_BLOCKS)
    with pytest.raises(ValueError, match="differ in shape") as info:
        lama.load_lama_checkpoint(ckpt, wider_config)
    assert str(ckpt) in str(info.value) and "model.1.ffc.convl2l.weight" in str(info.value)


def test_checkpoint_without_generator(tmp_path: Path, lama_dir: Path):
    _, config = paths(lama_dir)
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"discriminator.w": torch.zeros(2)}}, bad)
    with pytest.raises(ValueError, match="no 'generator.\\*' tensors") as info:
        lama.load_lama_checkpoint(bad, config)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "truncated"])
def test_corrupt_checkpoint_through_main(lama_dir: Path, tmp_path: Path, capsys, content):
    ckpt, config = paths(lama_dir)
    bad = tmp_path / "models" / "best.ckpt"
    bad.parent.mkdir()
    data = ckpt.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    out = tmp_path / "lama.onnx"
    assert run_cli("--checkpoint", str(bad), "--config", str(config), "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a readable PyTorch checkpoint" in err
    assert not out.exists()


def test_missing_files_through_main(lama_dir: Path, tmp_path: Path, capsys):
    ckpt, config = paths(lama_dir)
    out = str(tmp_path / "lama.onnx")
    assert run_cli("--checkpoint", str(tmp_path / "nope.ckpt"), "--config", str(config), "--output", out) == 2
    assert "nope.ckpt" in capsys.readouterr().err
    assert run_cli("--checkpoint", str(ckpt), "--config", str(tmp_path / "nope.yaml"), "--output", out) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_cli_needs_a_destination(lama_dir: Path):
    ckpt, config = paths(lama_dir)
    with pytest.raises(SystemExit):
        run_cli("--checkpoint", str(ckpt), "--config", str(config))


# ---------------------------------------------------------------------------------------------------------
# The config.
# ---------------------------------------------------------------------------------------------------------
def test_config_resolves_generator_interpolations_only(lama_dir: Path, monkeypatch):
    _, config = paths(lama_dir)
    assert "${generator.init_conv_kwargs.ratio_gout}" in config.read_text()
    monkeypatch.delenv("TORCH_HOME", raising=False)  # ${env:TORCH_HOME} elsewhere must not be resolved
    section = lama.load_lama_config(config)
    assert section["kind"] == "ffc_resnet"
    assert (section["ngf"], section["n_blocks"]) == (NGF, N_BLOCKS)
    assert section["downsample_conv_kwargs"]["ratio_gin"] == section["init_conv_kwargs"]["ratio_gout"] == 0
    assert section["resnet_conv_kwargs"]["ratio_gout"] == section["resnet_conv_kwargs"]["ratio_gin"] == 0.75


def test_config_shapes_the_generator(lama_dir: Path):
    _, config = paths(lama_dir)
    section = lama.load_lama_config(config)

    def blocks(model):
        return sum(isinstance(m, FFCResnetBlock) for m in model.modules())

    def params(model):
        return sum(p.numel() for p in model.parameters())

    base = generator_from_config(section)
    deeper = generator_from_config(dict(section, n_blocks=N_BLOCKS + 2))
    wider = generator_from_config(dict(section, ngf=2 * NGF))
    assert (blocks(base), blocks(deeper)) == (N_BLOCKS, N_BLOCKS + 2)
    assert params(wider) > 3 * params(base)
    assert base.model[1].ffc.convl2l.out_channels == NGF
    assert wider.model[1].ffc.convl2l.out_channels == 2 * NGF
    tanh = generator_from_config(dict(section, add_out_act=True))
    assert isinstance(tanh.model[-1], torch.nn.Tanh) and isinstance(base.model[-1], torch.nn.Sigmoid)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "pix2pixhd_global"}, "only 'ffc_resnet'"),
        ({"spatial_transform_layers": [1]}, "unsupported generator options"),
        ({"resnet_conv_kwargs": {"ratio_gin": 0.75, "gated": True}}, "unsupported FFC options"),
        ({"add_out_act": "relu"}, "add_out_act"),
    ],
)
def test_unsupported_configs_are_refused(lama_dir: Path, change: dict, message: str):
    section = lama.load_lama_config(paths(lama_dir)[1])
    with pytest.raises(ValueError, match=message):
        generator_from_config(dict(section, **change))


def test_config_errors_name_the_file(tmp_path: Path):
    broken = tmp_path / "config.yaml"
    broken.write_text("generator: [unclosed\n")
    with pytest.raises(ValueError, match="not a readable YAML") as info:
        lama.load_lama_config(broken)
    assert str(broken) in str(info.value)
    broken.write_text("training_model:\n  kind: default\n")
    with pytest.raises(ValueError, match="no 'generator' section"):
        lama.load_lama_config(broken)
    broken.write_text("generator:\n  kind: ffc_resnet\n  ngf: ${generator.nowhere}\n")
    with pytest.raises(ValueError, match="cannot resolve"):
        lama.load_lama_config(broken)
