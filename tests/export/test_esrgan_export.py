"""Real-ESRGAN export: the checkpoint reader, the architecture read from the tensors, onnxruntime parity of
the exported graph for each released variant, and our RRDBNet against spandrel's (when installed).

Random-weight checkpoints in the official format come from export/make_esrgan.py. The parity test runs each
released variant at its real width, x4plus and x2plus with 4 of their 23 blocks to keep it short (x2's own
part, the pixel-unshuffle, is in front of the blocks); RealESRGAN_x4plus is also exported once at its real
size (~30 s of torch.export on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import importlib.util
import io
import os
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from isekai import constants as C
from isekai.ensemble.upscale import upscale_image
from isekai.export import cli as export_cli
from isekai.export import esrgan
from isekai.export.common import ort_session
from isekai.export.make_esrgan import VARIANTS, make_esrgan_checkpoint, random_esrgan

X1 = esrgan.RRDBConfig(num_block=1, num_feat=16, num_grow_ch=32, scale=1)  # no released x1 RRDBNet: made here
SPANDREL_INSTALL = "pip install --no-deps spandrel==0.4.2 einops==0.8.2"
SPANDREL_TOLERANCE = 1e-5  # same float32 operations in the same order: measured 0.0


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    esrgan.add_arguments(parser)
    return esrgan.main(parser.parse_args(list(argv)))


def run_graph(path: Path, image: torch.Tensor) -> np.ndarray:
    return ort_session(path).run([C.ESRGAN_OUT_UPSCALED], {C.ESRGAN_IN_IMAGE: image.numpy()})[0]


def save_params(path: Path, state: dict, key: str = "params_ema") -> Path:
    torch.save({key: state}, path)
    return path


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory) -> Path:
    return make_esrgan_checkpoint(tmp_path_factory.mktemp("esrgan") / "tiny.pth", "tiny")


@pytest.fixture(scope="module")
def tiny_state(tiny_pth: Path) -> dict[str, torch.Tensor]:
    return esrgan.read_state_dict(tiny_pth)


@pytest.fixture(scope="module")
def x4plus(tmp_path_factory) -> tuple[Path, Path, str]:
    """RealESRGAN_x4plus at full size, exported through the command line: (checkpoint, graph, stdout)."""
    folder = tmp_path_factory.mktemp("x4plus")
    ckpt = make_esrgan_checkpoint(folder / "RealESRGAN_x4plus.pth", "x4plus")
    out = folder / "upscale.onnx"
    stdout = io.StringIO()  # capsys is per test; this fixture is per module
    with contextlib.redirect_stdout(stdout):
        assert run_cli("--checkpoint", str(ckpt), "--output", str(out)) == 0
    return ckpt, out, stdout.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The exported graph.
# ---------------------------------------------------------------------------------------------------------
def test_x4plus_real_size_parity(x4plus):
    """The real 23-block architecture (exported once, at small sizes: 24x32 and 36x52, to stay fast)."""
    ckpt, _, stdout = x4plus
    assert esrgan.load_esrgan(ckpt).config == esrgan.OFFICIAL_ARCHITECTURES["RealESRGAN_x4plus"]
    lines = [line for line in stdout.splitlines() if line.startswith("parity ")]  # torch.onnx prints too
    assert len(lines) == len(esrgan.PARITY_SIZES)
    for line, (h, w) in zip(lines, esrgan.PARITY_SIZES, strict=True):
        prefix = f"parity {C.UPSCALE_MODEL}: {C.ESRGAN_OUT_UPSCALED}: max|ort-torch|="
        assert line.startswith(prefix) and line.endswith(f"at input {h}x{w}")
        assert float(line.removeprefix(prefix).split()[0]) <= esrgan.PARITY_ATOL


def test_graph_names_and_dynamic_axes(x4plus):
    graph = onnx.load(str(x4plus[1])).graph
    assert [i.name for i in graph.input] == [C.ESRGAN_IN_IMAGE]
    assert [o.name for o in graph.output] == [C.ESRGAN_OUT_UPSCALED]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(graph.input[0]) == [1, 3, "H", "W"]
    assert dims(graph.output[0]) == [1, 3, "4H", "4W"]


# x4plus and x2plus at their real width with 4 of their 23 blocks (the real x4plus is above); anime_6B whole.
@pytest.mark.parametrize("variant, num_block", [("x4plus", 4), ("x4plus_anime_6B", None), ("x2plus", 4)])
def test_variant_parity_at_two_sizes(variant: str, num_block: int | None, tmp_path: Path):
    ckpt = make_esrgan_checkpoint(tmp_path / f"{variant}.pth", variant, num_block=num_block)
    out = tmp_path / "upscale.onnx"
    reports = esrgan.export_esrgan(ckpt, output=out)
    assert list(reports) == list(esrgan.PARITY_SIZES)
    assert all(r.worst() <= esrgan.PARITY_ATOL for r in reports.values())
    assert all(0.5 < r.max_ref[C.ESRGAN_OUT_UPSCALED] < 5 for r in reports.values())  # outputs span ~0..1
    scale = VARIANTS[variant].scale
    graph = onnx.load(str(out)).graph
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim[2:]] == [f"{scale}H", f"{scale}W"]
    image = esrgan.esrgan_inputs(16, 24, seed=3)[C.ESRGAN_IN_IMAGE]
    assert run_graph(out, image).shape == (1, 3, 16 * scale, 24 * scale)

    # The pipeline's tiling feeds this graph what it accepts, odd-sized photos included.
    session = ort_session(out)
    photo = np.random.default_rng(0).integers(0, 256, (15, 21, 3), dtype=np.uint8)
    upscaled = upscale_image(photo, lambda x: session.run(None, {C.ESRGAN_IN_IMAGE: x})[0], scale, tile=8)
    assert upscaled.shape == (15 * scale, 21 * scale, 3) and upscaled.dtype == np.uint8


def test_x1_network_parity(tmp_path: Path):
    ckpt = save_params(tmp_path / "x1.pth", random_esrgan(X1).state_dict())
    reports = esrgan.export_esrgan(ckpt, output=tmp_path / "x1.onnx")
    assert all(r.worst() <= esrgan.PARITY_ATOL for r in reports.values())
    graph = onnx.load(str(tmp_path / "x1.onnx")).graph
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim[2:]] == ["H", "W"]


def test_registered_and_writes_the_repository_layout(tiny_pth: Path, tmp_path: Path, capsys):
    # `isekai export esrgan` resolves to this module (building the whole parser would import every exporter).
    assert export_cli.EXPORTERS["esrgan"][0] == esrgan.__name__
    repo = tmp_path / "repo"
    assert run_cli("--checkpoint", str(tiny_pth), "--repository", str(repo)) == 0
    assert (repo / C.UPSCALE_MODEL / C.MODEL_VERSION / C.ONNX_FILENAME).is_file()
    assert not (repo / C.UPSCALE_MODEL / "config.pbtxt").exists()  # serving is configured elsewhere
    assert capsys.readouterr().out.count(f"parity {C.UPSCALE_MODEL}") == len(esrgan.PARITY_SIZES)


def test_cli_needs_a_destination(tiny_pth: Path):
    with pytest.raises(SystemExit):
        run_cli("--checkpoint", str(tiny_pth))


# ---------------------------------------------------------------------------------------------------------
# The architecture, read from the tensors.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_architecture_is_read_from_the_state_dict(variant: str, tmp_path: Path):
    # Untrained weights (make_esrgan's random ones cost a forward pass) under a misleading file name.
    state = esrgan.RRDBNet(VARIANTS[variant]).state_dict()
    ckpt = save_params(tmp_path / "RealESRGAN_x4plus_anime_6B.pth", state)
    assert esrgan.infer_config(esrgan.read_state_dict(ckpt), ckpt) == VARIANTS[variant]


def test_architecture_names_and_overrides(tmp_path: Path):
    assert esrgan.official_name(VARIANTS["x2plus"]) == "RealESRGAN_x2plus"
    assert esrgan.official_name(VARIANTS["tiny"]) is None
    ckpt = make_esrgan_checkpoint(tmp_path / "x.pth", "x2plus", num_block=3)
    assert esrgan.load_esrgan(ckpt).config == esrgan.RRDBConfig(3, 64, 32, scale=2)
    ckpt = save_params(tmp_path / "x1.pth", random_esrgan(X1).state_dict())
    assert esrgan.load_esrgan(ckpt).config == X1


def test_loaded_weights_are_the_files(tiny_pth: Path, tiny_state: dict):
    saved = torch.load(tiny_pth, weights_only=True)
    assert list(saved) == ["params_ema"]
    model = esrgan.load_esrgan(tiny_pth)
    assert not model.training
    got = model.state_dict()
    assert got.keys() == saved["params_ema"].keys()
    assert all(torch.equal(got[k], v) for k, v in saved["params_ema"].items())


def test_safetensors_params_and_fp16_load_the_same(tiny_state: dict, tmp_path: Path):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state, str(path))
    assert make_esrgan_checkpoint(tmp_path / "made.safetensors", "tiny").is_file()
    from_safetensors = esrgan.read_state_dict(path)
    from_params = esrgan.read_state_dict(save_params(tmp_path / "p.pth", tiny_state, key="params"))
    halves = {k: v.half() for k, v in tiny_state.items()}
    half = esrgan.read_state_dict(save_params(tmp_path / "h.pth", halves))
    for state in (from_safetensors, from_params):
        assert all(torch.equal(state[k], v) for k, v in tiny_state.items())
    assert all(v.dtype == torch.float32 for v in half.values())


def test_params_ema_wins_over_params(tiny_state: dict, tmp_path: Path):
    other = {k: torch.zeros_like(v) for k, v in tiny_state.items()}
    path = tmp_path / "both.pth"
    torch.save({"params": other, "params_ema": tiny_state}, path)
    assert torch.equal(esrgan.read_state_dict(path)["conv_first.weight"], tiny_state["conv_first.weight"])


# ---------------------------------------------------------------------------------------------------------
# Bad files: one ValueError naming the file and the problem.
# ---------------------------------------------------------------------------------------------------------
def bad_state(tiny_state: dict, change: str) -> dict:
    state = dict(tiny_state)
    if change == "unknown":
        state["body.0.rdb1.conv6.weight"] = torch.zeros(8, 56, 3, 3)
    elif change == "missing":
        del state["conv_hr.bias"]
    elif change == "shape":
        state["conv_last.weight"] = torch.zeros(4, 16, 3, 3)
        state["conv_last.bias"] = torch.zeros(4)
    elif change == "channels":
        state["conv_first.weight"] = torch.zeros(16, 5, 3, 3)
    elif change == "gap":
        state = {k.replace("body.1.", "body.2."): v for k, v in state.items()}
    elif change == "not_esrgan":  # SRVGGNetCompact (realesr-general-x4v3): another Real-ESRGAN network
        state = {"body.0.weight": torch.zeros(64, 3, 3, 3), "body.0.bias": torch.zeros(64)}
    elif change == "not_tensor":
        state["conv_hr.bias"] = [0.0] * 16
    return state


@pytest.mark.parametrize(
    "change, message",
    [
        ("unknown", r"1 unknown keys \(first: \['body.0.rdb1.conv6.weight'\]\)"),
        ("missing", r"1 missing keys \(first: \['conv_hr.bias'\]\)"),
        ("shape", r"differ in shape .*conv_last.weight \(4, 16, 3, 3\) vs \(3, 16, 3, 3\)"),
        ("channels", r"conv_first.weight takes 5 input channels; RRDBNet takes 3 \(x4\), 12 \(x2\), 48"),
        ("gap", r"body.N are missing or not numbered 0..n-1: \[0, 2\]"),
        ("not_esrgan", r"not a Real-ESRGAN RRDBNet state dict, no conv_first.weight"),
        ("not_tensor", r"not tensors: \['conv_hr.bias'\]"),
    ],
)
def test_bad_state_dicts(tiny_state: dict, tmp_path: Path, change: str, message: str):
    path = save_params(tmp_path / f"{change}.pth", bad_state(tiny_state, change))
    with pytest.raises(ValueError, match=message) as info:
        esrgan.load_esrgan(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"state_dict": {"conv_first.weight": torch.zeros(1)}}, r"no 'params_ema' or 'params' .*state_dict"),
        ("bare", r"no 'params_ema' or 'params' .*a bare state dict: save it as"),
        ({"params_ema": [1, 2]}, r"'params_ema' is a list, not a state dict"),
        ([torch.zeros(2)], r"holds a list, expected a dict"),
    ],
)
def test_wrong_containers(tiny_state: dict, tmp_path: Path, content, message: str):
    path = tmp_path / "wrong.pth"
    torch.save(dict(tiny_state) if content == "bare" else content, path)
    with pytest.raises(ValueError, match=message):
        esrgan.read_state_dict(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "absent"])
def test_unreadable_files_through_main(tiny_state: dict, tmp_path: Path, capsys, suffix: str, how: str):
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        save_params(good, tiny_state)
    else:
        save_file(tiny_state, str(good))
    bad = tmp_path / f"bad{suffix}"
    if how == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "upscale.onnx"
    assert run_cli("--checkpoint", str(bad), "--output", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert err.startswith("isekai export esrgan: error: Real-ESRGAN checkpoint") and str(bad) in err
    expected = {"absent": "no such file", ".pth": "not a readable PyTorch checkpoint",
                ".safetensors": "not a readable safetensors file"}
    assert expected["absent" if how == "absent" else suffix] in err
    assert not out.exists()


class _RunsCommand:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_foreign_code_in_a_checkpoint_is_not_run(tiny_state: dict, tmp_path: Path):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pth"
    torch.save({"params_ema": tiny_state, "train_opts": _RunsCommand(f"touch {marker}")}, path)
    model = esrgan.load_esrgan(path)
    assert not marker.exists()
    assert torch.equal(model.conv_first.weight, tiny_state["conv_first.weight"])

    torch.save({"params_ema": {**tiny_state, "conv_hr.bias": _RunsCommand(f"touch {marker}")}}, path)
    with pytest.raises(ValueError, match=r"not tensors: \['conv_hr.bias'\]"):
        esrgan.load_esrgan(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Reference: spandrel's RRDBNet (MIT) on the same checkpoint.
# ---------------------------------------------------------------------------------------------------------
def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """The torchvision names spandrel imports (for its LaMa and RestoreFormer, not ESRGAN): the torchvision
    wheel cannot be imported beside the CPU torch here (its C++ operators do not load)."""
    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def unavailable(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("torchvision stand-in: not used by the ESRGAN architecture")

    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = InterpolationMode
    functional.rotate = functional.normalize = unavailable
    root.transforms, transforms.functional = transforms, functional
    return {m.__name__: m for m in (root, transforms, functional)}


@pytest.fixture(scope="module")
def spandrel():
    missing = [name for name in ("spandrel", "einops") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (test tool: {SPANDREL_INSTALL})")
    with pytest.MonkeyPatch.context() as patch:
        for name, module in _torchvision_stand_in().items():
            patch.setitem(sys.modules, name, module)
        import spandrel as module  # noqa: PLC0415

        yield module
    # spandrel's modules hold the stand-in: drop them so nothing after this test sees them.
    for name in [m for m in sys.modules if m == "spandrel" or m.startswith("spandrel.")]:
        sys.modules.pop(name)


# spandrel fixes the growth channels at 32 (it does not read them from the file): the released widths.
@pytest.mark.parametrize(
    "variant, config",
    [
        ("x4plus", esrgan.RRDBConfig(2, 64, 32, scale=4)),
        ("x4plus_anime_6B", VARIANTS["x4plus_anime_6B"]),
        ("x2plus", esrgan.RRDBConfig(2, 64, 32, scale=2)),
        ("x1", X1),
    ],
)
def test_same_output_as_spandrel(spandrel, variant: str, config: esrgan.RRDBConfig, tmp_path: Path):
    path = save_params(tmp_path / f"{variant}.pth", random_esrgan(config, seed=5).state_dict())
    ours = esrgan.load_esrgan(path)
    assert ours.config == config
    theirs = spandrel.ModelLoader().load_from_file(str(path))
    assert theirs.architecture.id == "ESRGAN" and theirs.scale == config.scale
    image = esrgan.esrgan_inputs(24, 32, seed=9)[C.ESRGAN_IN_IMAGE]
    with torch.no_grad():
        want = theirs.model.eval()(image)
        got = ours(image)
    assert got.shape == want.shape == (1, 3, 24 * config.scale, 32 * config.scale)
    assert (got - want).abs().max().item() <= SPANDREL_TOLERANCE
