"""A LoRA as an onnxruntime adapter for the exported base graph, or fused into PyTorch weights.

:func:`adapter_params` fits a LoRA's layers (:mod:`isekai.export.lora_formats`) to the LoRA slots of an
exported graph (:mod:`isekai.export.lora_slots`), checking every shape against the base layer, and folds the
scale into the up factor: a Linear slot takes ``A = down.T`` [in, r] and ``B = (scale * up).T`` [r, out]; a
Conv2d slot takes ``A = down`` [r, in, kh, kw] and ``B = scale * up`` [out, r, 1, 1]. :func:`write_adapter`
stores them as an ``.onnx_adapter`` file (``onnxruntime.AdapterFormat``) that ``onnxruntime.LoraAdapter``
loads and ``RunOptions.add_active_adapter`` applies to one run.

:func:`fuse_into` adds ``scale * up @ down`` to a PyTorch module's weights, as diffusers' ``fuse_lora`` does:
the text encoder's LoRA is fused when a character's prompt embeddings are computed, and tests compare the
served adapter against a fused model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from isekai.export.lora_formats import LoraLayer
from isekai.export.lora_slots import SLOT_A, SLOT_B, SlotShape

ADAPTER_SUFFIX = ".onnx_adapter"


def _fit(path: str, layer: LoraLayer, slot: SlotShape, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one slot from one layer's factors, or ValueError naming the layer and both shapes."""
    down, up = layer.down, layer.up
    if slot.kind == "linear" and down.ndim == 4:  # a Linear adapted by 1x1 conv factors
        if down.shape[2:] != (1, 1):
            raise ValueError(f"{where} layer {path!r} is Linear but its LoRA is a "
                             f"{down.shape[2]}x{down.shape[3]} conv")
        down, up = down[:, :, 0, 0], up[:, :, 0, 0]
    if slot.kind == "conv" and down.ndim == 2:  # a 1x1 conv adapted by Linear-shaped factors
        if slot.kernel != (1, 1):
            raise ValueError(f"{where} layer {path!r} is a {slot.kernel} conv but its LoRA is Linear-shaped")
        down, up = down[:, :, None, None], up[:, :, None, None]
    want_in = (slot.in_features, *slot.kernel) if slot.kind == "conv" else (slot.in_features,)
    if tuple(down.shape[1:]) != want_in or up.shape[0] != slot.out_features:
        raise ValueError(
            f"{where} layer {path!r}: the LoRA maps {list(down.shape[1:])} -> {up.shape[0]} but the base "
            f"layer maps {list(want_in)} -> {slot.out_features}: a LoRA made for another base model (SD 2.x, "
            "SDXL, ...)"
        )
    if slot.kind == "linear":
        return (np.ascontiguousarray(down.T, np.float32),
                np.ascontiguousarray((up * layer.scale).T, np.float32))
    return np.ascontiguousarray(down, np.float32), np.ascontiguousarray(up * layer.scale, np.float32)


def adapter_params(
    layers: Mapping[str, LoraLayer], slots: Mapping[str, SlotShape], where: str
) -> dict[str, np.ndarray]:
    """The adapter's parameters (slot input name -> float32 array) for ``layers`` on a graph with ``slots``.

    ``where`` names the model in errors (e.g. ``"unet"``). A layer without a slot is refused: the exported
    base was made with narrower ``--lora-targets`` than the LoRA adapts.
    """
    params: dict[str, np.ndarray] = {}
    for path, layer in layers.items():
        slot = slots.get(path)
        if slot is None:
            raise ValueError(
                f"{where} layer {path!r} has no LoRA slot in the exported {where} graph ({len(slots)} "
                "slots): export the base again with wider --lora-targets (e.g. all)"
            )
        params[path + SLOT_A], params[path + SLOT_B] = _fit(path, layer, slot, where)
    return params


def stack(*adapters: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Several adapters as one: their factors concatenated along the rank
    (``B1 A1 + B2 A2 = [B1 B2] [A1; A2]``)."""
    out: dict[str, np.ndarray] = {}
    for params in adapters:
        for name, value in params.items():
            if name not in out:
                out[name] = value
                continue
            axis = (1 if value.ndim == 2 else 0) if name.endswith(SLOT_A) else (0 if value.ndim == 2 else 1)
            out[name] = np.ascontiguousarray(np.concatenate([out[name], value], axis=axis))
    return out


def write_adapter(params: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write ``params`` as an onnxruntime adapter file; returns ``path``."""
    import onnxruntime as ort  # noqa: PLC0415

    if not params:
        raise ValueError("an adapter needs at least one layer")
    path = Path(path)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(
        {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    )
    adapter.export_adapter(str(path))
    return path


def read_adapter(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of an ``.onnx_adapter`` file, as numpy arrays."""
    import onnxruntime as ort  # noqa: PLC0415

    adapter = ort.AdapterFormat.read_adapter(str(path))
    # Copies: the arrays would otherwise point into the adapter's memory, which goes with the adapter object.
    return {k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()}


def fuse_into(module, layers: Mapping[str, LoraLayer]) -> None:
    """Add each layer's ``scale * up @ down`` to ``module``'s weights in place (``module`` a
    torch.nn.Module)."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        for path, layer in layers.items():
            target = module.get_submodule(path)
            weight = target.weight
            down = torch.from_numpy(layer.down).to(weight.dtype)
            up = torch.from_numpy(layer.up).to(weight.dtype) * layer.scale
            if weight.ndim == 2:
                if down.ndim == 4:
                    down, up = down[:, :, 0, 0], up[:, :, 0, 0]
                delta = up @ down
            else:
                if down.ndim == 2:
                    down, up = down[:, :, None, None], up[:, :, None, None]
                delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            if delta.shape != weight.shape:
                raise ValueError(f"layer {path!r}: LoRA delta {list(delta.shape)} != weight "
                                 f"{list(weight.shape)}")
            weight += delta
