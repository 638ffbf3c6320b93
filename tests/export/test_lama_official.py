"""Our FFC-ResNet against the official LaMa code, when a checkout of advimman/lama is at hand.

Set ``ISEKAI_LAMA_REPO=/path/to/lama`` (a clone of https://github.com/advimman/lama) to run; skipped
otherwise.
Only ``saicinpainting/training/modules/ffc.py`` and the pure-torch modules it imports are used, straight from
the checkout: its kornia/pytorch-lightning imports (spatial transform, utils), unused by the generator, are
stubbed in ``sys.modules`` for the duration of the test. Nothing of the official code is copied here.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from isekai.export import lama
from isekai.export.ffc import generator_from_config
from isekai.export.make_lama import make_lama_checkpoint, randomize_batchnorm

REPO = os.environ.get("ISEKAI_LAMA_REPO")
pytestmark = pytest.mark.skipif(
    not REPO, reason="set ISEKAI_LAMA_REPO to a checkout of advimman/lama to compare with the official code"
)
# Same weights, same input: the official code and ours run the same float32 operations (0 difference with
# torch.fft); the matmul DFT rounds differently, ~1e-7 on 0..1 outputs.
TOLERANCE = 1e-4


@pytest.fixture
def official_ffc(monkeypatch):
    """The official ``saicinpainting.training.modules.ffc`` module, imported from the checkout."""
    repo = Path(REPO)
    modules = repo / "saicinpainting" / "training" / "modules"
    if not (modules / "ffc.py").is_file():
        pytest.fail(f"ISEKAI_LAMA_REPO={REPO} has no saicinpainting/training/modules/ffc.py")
    for name in [m for m in sys.modules if m == "saicinpainting" or m.startswith("saicinpainting.")]:
        monkeypatch.delitem(sys.modules, name)
    # Packages without their __init__ (which would import the training stack), and stubs for the two imports
    # ffc.py makes that need kornia / pytorch-lightning and that the generator does not use.
    for name, path in (
        ("saicinpainting", repo / "saicinpainting"),
        ("saicinpainting.training", repo / "saicinpainting" / "training"),
        ("saicinpainting.training.modules", modules),
    ):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        monkeypatch.setitem(sys.modules, name, package)
    for name, attribute in (
        ("saicinpainting.training.modules.spatial_transform", "LearnableSpatialTransformWrapper"),
        ("saicinpainting.utils", "get_shape"),
    ):
        stub = types.ModuleType(name)
        setattr(stub, attribute, None)
        monkeypatch.setitem(sys.modules, name, stub)
    module = importlib.import_module("saicinpainting.training.modules.ffc")
    yield module
    # The official modules imported above are not monkeypatch's to undo: drop them so no test sees them.
    for name in [m for m in sys.modules if m.startswith("saicinpainting.training.modules.")]:
        sys.modules.pop(name)


def official_generator(official_ffc, section: dict) -> torch.nn.Module:
    kwargs = {k: v for k, v in section.items() if k != "kind"}
    return official_ffc.FFCResNetGenerator(**kwargs).eval()


def test_big_lama_state_dict_layout_is_official(official_ffc, tmp_path: Path):
    _, config = make_lama_checkpoint(tmp_path / "cfg", ngf=4, n_blocks=0)  # only the config is used
    section = dict(lama.load_lama_config(config), ngf=64, n_blocks=18)  # big-lama's sizes
    ours = generator_from_config(section).state_dict()
    theirs = official_generator(official_ffc, section).state_dict()
    assert len(theirs) == 989
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)


@pytest.mark.parametrize("dft", ["fft", "matmul"])
@pytest.mark.parametrize("size", [(64, 96), (40, 56)])
def test_same_outputs_as_official(official_ffc, tmp_path: Path, dft: str, size: tuple[int, int]):
    ckpt, config = make_lama_checkpoint(tmp_path / "small", ngf=16, n_blocks=2)
    section = lama.load_lama_config(config)
    theirs = official_generator(official_ffc, section)
    theirs.load_state_dict(lama.generator_state(lama.read_checkpoint(ckpt)), strict=True)
    ours = lama.load_lama_checkpoint(ckpt, section).set_dft(dft)
    x = torch.rand((1, 4, *size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("dft", ["fft", "matmul"])
def test_other_ratios_and_lfu_match_official(official_ffc, tmp_path: Path, dft: str):
    """Global channels from the first layer on, stride-2 spectral transforms, and the local Fourier unit."""
    _, config = make_lama_checkpoint(tmp_path / "cfg", ngf=4, n_blocks=0)
    section = dict(
        lama.load_lama_config(config),
        ngf=16,
        n_blocks=2,
        add_out_act=True,
        init_conv_kwargs={"ratio_gin": 0, "ratio_gout": 0.25, "enable_lfu": False},
        downsample_conv_kwargs={"ratio_gin": 0.25, "ratio_gout": 0.25, "enable_lfu": True},
        resnet_conv_kwargs={"ratio_gin": 0.5, "ratio_gout": 0.5, "enable_lfu": True},
    )
    torch.manual_seed(0)
    theirs = official_generator(official_ffc, section)
    randomize_batchnorm(theirs, torch.Generator().manual_seed(1))
    ours = generator_from_config(section).eval().set_dft(dft)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand((1, 4, 64, 64), generator=torch.Generator().manual_seed(0))  # LFU needs square inputs
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=TOLERANCE, rtol=0)
