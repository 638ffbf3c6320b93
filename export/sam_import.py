"""segment-anything's model code, imported without running the package ``__init__``.

segment-anything 1.0's ``segment_anything/__init__.py`` imports ``SamAutomaticMaskGenerator`` and
``SamPredictor``, whose modules import torchvision at import time (``torchvision.ops`` for NMS,
``torchvision.transforms.functional`` for resizing). The exporter needs none of that: only the network
(``segment_anything.modeling``), its builder (``segment_anything.build_sam``) and the ONNX decoder wrapper
(``segment_anything.utils.onnx``), which import torch alone. torchvision is not a dependency of this project.

So the package is registered in ``sys.modules`` as an empty module with the real ``__path__``; Python then
finds and imports the submodules from the installed files as usual, and the package ``__init__`` never runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

PACKAGE = "segment_anything"


def _register_package_without_init() -> None:
    """Put ``segment_anything`` in sys.modules as a namespace-like module so its __init__ is skipped."""
    if PACKAGE in sys.modules:
        # Already imported (by us, or fully by someone with torchvision installed): either serves.
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the {PACKAGE!r} package is not installed: pip install segment-anything==1.0 "
            "(the exporter uses its model code to load SAM checkpoints)"
        )
    package = types.ModuleType(PACKAGE, "segment-anything without its __init__ (isekai.export.sam_import)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    # A spec whose loader is None marks a package that has nothing to execute; keep the search locations.
    package.__spec__ = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
    package.__spec__.submodule_search_locations = package.__path__
    package.__package__ = PACKAGE
    sys.modules[PACKAGE] = package


_register_package_without_init()

modeling = importlib.import_module(f"{PACKAGE}.modeling")
build_sam = importlib.import_module(f"{PACKAGE}.build_sam")
onnx_utils = importlib.import_module(f"{PACKAGE}.utils.onnx")

Sam = modeling.Sam
ImageEncoderViT = modeling.ImageEncoderViT
SamOnnxModel = onnx_utils.SamOnnxModel
# segment-anything's own builder: (encoder_embed_dim, encoder_depth, encoder_num_heads,
# encoder_global_attn_indexes, checkpoint=None) -> Sam. Private in name, but it is the one function every
# official build_sam_vit_* calls, so our checkpoints and the official ones come from the same code.
build_sam_from_encoder_config = build_sam._build_sam

__all__ = [
    "ImageEncoderViT",
    "Sam",
    "SamOnnxModel",
    "build_sam_from_encoder_config",
    "modeling",
    "onnx_utils",
]
