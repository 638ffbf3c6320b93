"""TEST-ONLY: MobileSAM's own code (the PyPI package ``mobilesam-mirror``, import name ``mobile_sam``), the
reference our TinyViT and the exported vit_t graphs are compared against.

``mobile_sam`` imports, at module level, names from packages isekai does not depend on:

- ``timm.models.layers``: ``DropPath`` (a base class; MobileSAM builds none at drop-path rate 0),
  ``to_2tuple``, ``trunc_normal_`` (weight init); ``timm.models.registry``: ``register_model`` (a decorator);
- ``torchvision.transforms.functional``: ``resize``, ``to_pil_image`` (``ResizeLongestSide.apply_image``);
- ``torchvision.ops.boxes``: ``batched_nms``, ``box_area`` (the automatic mask generator, never used here).

So :func:`load` lends the import faithful stand-ins for exactly those names (or ones that raise, for the mask
generator's), for the duration of that one import, then takes them out of ``sys.modules``: nothing else in the
test process can see a ``timm`` or ``torchvision`` module afterwards. The stand-ins do what the real functions
do for the arguments MobileSAM passes (``to_2tuple(1024)`` = (1024, 1024); timm's ``trunc_normal_`` has
torch's signature and meaning; torchvision's PIL resize as in :mod:`tests.reference_sam`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

MOBILE_SAM_INSTALL = "pip install mobilesam-mirror==1.0.0"


def _reference_sam() -> types.ModuleType:
    """tests/reference_sam.py (for its torchvision stand-in functions), wherever pytest put tests/ on
    sys.path."""
    path = Path(__file__).resolve().parent / "reference_sam.py"
    spec = importlib.util.spec_from_file_location("reference_sam", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _DropPath(nn.Module):
    """timm's DropPath at inference: the identity (MobileSAM subclasses it and builds none at rate 0)."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _unavailable(*args: object, **kwargs: object) -> None:
    raise NotImplementedError("TEST-ONLY stand-in: the automatic mask generator is not used by these tests")


def _stand_ins() -> dict[str, types.ModuleType]:
    ref = _reference_sam()
    modules = {
        name: types.ModuleType(name, "TEST-ONLY stand-in (tests/reference_mobile_sam.py)")
        for name in (
            "timm",
            "timm.models",
            "timm.models.layers",
            "timm.models.registry",
            "torchvision",
            "torchvision.transforms",
            "torchvision.transforms.functional",
            "torchvision.ops",
            "torchvision.ops.boxes",
        )
    }
    layers, registry = modules["timm.models.layers"], modules["timm.models.registry"]
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = _DropPath, _to_2tuple, nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    functional = modules["torchvision.transforms.functional"]
    functional.resize, functional.to_pil_image = ref._resize, ref._to_pil_image
    boxes = modules["torchvision.ops.boxes"]
    boxes.batched_nms = boxes.box_area = _unavailable
    for name, module in modules.items():  # parents hold their children as attributes, as real packages do
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def load() -> types.ModuleType:
    """The ``mobile_sam`` package; raises ImportError when mobilesam-mirror is not installed."""
    if importlib.util.find_spec("mobile_sam") is None:
        raise ImportError(f"mobilesam-mirror is not installed ({MOBILE_SAM_INSTALL})")
    if "mobile_sam" in sys.modules:
        return sys.modules["mobile_sam"]
    # Stand-ins even where timm or torchvision are installed: the reference then runs the same code everywhere
    # (and torchvision's wheel does not import beside the CPU torch here).
    lent = _stand_ins()
    saved = {name: sys.modules.get(name) for name in lent}
    sys.modules.update(lent)
    try:
        return importlib.import_module("mobile_sam")
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def predictor(state: dict[str, torch.Tensor]):
    """MobileSAM's ``SamPredictor`` on ``build_sam_vit_t`` with ``state`` loaded strictly.

    ``eval()`` is called again after loading, as MobileSAM's README does: its Attention caches the gathered
    biases on ``eval()``, and ``build_sam_vit_t`` calls ``eval()`` before it loads a checkpoint."""
    mobile_sam = load()
    model = mobile_sam.sam_model_registry["vit_t"]()
    model.load_state_dict(state)
    return mobile_sam.SamPredictor(model.eval())
