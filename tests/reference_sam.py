"""TEST-ONLY: segment-anything's ``SamPredictor``, the reference the exported SAM graphs are compared against.

``segment_anything/predictor.py`` imports ``segment_anything/utils/transforms.py``, which imports ``resize``
and ``to_pil_image`` from ``torchvision.transforms.functional`` for ``ResizeLongestSide.apply_image``.
torchvision is not a dependency of isekai (nothing in the project or the server imports it), so when it is
absent this helper lends the import a faithful stand-in for exactly those two functions, for the duration
of that one import, and takes it out of ``sys.modules`` again: nothing else in the test process can see a
``torchvision`` module afterwards. With torchvision installed, the real one is used.

The stand-in reproduces what torchvision does for these arguments: ``to_pil_image`` of an HxWx3 uint8 array
is ``Image.fromarray(array)`` (mode RGB); ``resize`` of a PIL image to ``(h, w)`` is
``image.resize((w, h), Image.BILINEAR)`` (torchvision's default interpolation; PIL always antialiases).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Registers segment_anything without running its torchvision-importing __init__.
import isekai.export.sam_import  # noqa: F401

_STAND_IN_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _to_pil_image(pic: np.ndarray) -> Image.Image:
    """torchvision's to_pil_image for what SAM passes: an HxWx3 uint8 RGB array."""
    if not (isinstance(pic, np.ndarray) and pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3):
        shape = getattr(pic, "shape", None)
        raise TypeError(f"test stand-in handles HxWx3 uint8 arrays only, got {type(pic).__name__} {shape}")
    return Image.fromarray(pic)  # mode RGB for HxWx3 uint8


def _resize(img: Image.Image, size: Sequence[int]) -> Image.Image:
    """torchvision's resize of a PIL image to ``size`` = (h, w) with its default bilinear interpolation."""
    if not isinstance(img, Image.Image) or len(size) != 2:
        raise TypeError(f"test stand-in handles a PIL image and an (h, w) size, got {type(img)} {size}")
    h, w = (int(v) for v in size)
    return img.resize((w, h), Image.BILINEAR)


def _import_predictor_module() -> types.ModuleType:
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("segment_anything.predictor")
    functional = types.ModuleType("torchvision.transforms.functional", "TEST-ONLY stand-in")
    functional.resize = _resize
    functional.to_pil_image = _to_pil_image
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    stand_ins = dict(zip(_STAND_IN_MODULES, (package, transforms, functional), strict=True))
    saved = {name: sys.modules.get(name) for name in _STAND_IN_MODULES}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("segment_anything.predictor")
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


SamPredictor = _import_predictor_module().SamPredictor
