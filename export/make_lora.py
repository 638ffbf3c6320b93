"""Write random LoRA files in the layouts people bring, for a base model's layers (tests, the demo,
benchmarks).

The same layouts :mod:`isekai.export.lora_formats` reads, made from the layer shapes of an exported base (its
LoRA slots, :class:`isekai.export.characters.Base`): ``diffusers`` (``pytorch_lora_weights.safetensors`` as
``train_dreambooth_lora.py`` saves it, with ``lora_adapter_metadata`` when alpha differs from the rank),
``diffusers-processors`` (the older attention-processor keys), ``peft`` (a folder with
``adapter_config.json``) and ``kohya`` (``lora_unet_`` / ``lora_te_`` keys with ``.alpha``). Random weights,
real formats.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from isekai.export.lora_slots import SlotShape

LAYOUTS = ("diffusers", "diffusers-processors", "peft", "kohya")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# The UNet modules the LCM-LoRA adapts (diffusers' train_lcm_distill_lora_sd.py target_modules, which made
# latent-consistency/lcm-lora-sdv1-5): attention, the transformer blocks' projections and feed-forward, and
# the resnets' convolutions, time projections and the resamplers; not conv_in/conv_out or the time embedding.
LCM_LORA_TARGETS = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def random_factors(
    shapes: Mapping[str, SlotShape], rank: int, seed: int, strength: float = 0.5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer (down, up) in the layer's layout (Linear [r, in] / [out, r]; Conv2d [r, in, kh, kw] /
    [out, r, 1, 1]), float32, sized so ``up @ down`` is about ``strength`` times a unit-variance layer's
    output."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in sorted(shapes.items()):
        fan_in = shape.in_features * shape.kernel[0] * shape.kernel[1]
        down = rng.standard_normal(
            shape.a_shape(rank)[::-1] if shape.kind == "linear" else shape.a_shape(rank)
        )
        up = rng.standard_normal(shape.b_shape(rank)[::-1] if shape.kind == "linear" else shape.b_shape(rank))
        out[path] = ((down / np.sqrt(fan_in)).astype(np.float32),
                     (up * strength / np.sqrt(rank)).astype(np.float32))
    return out


def _save(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.numpy import save_file  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata=dict(metadata or {}))
    return path


def write_lora(
    path: str | Path,
    unet: Mapping[str, tuple[np.ndarray, np.ndarray]],
    text_encoder: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    layout: str = "diffusers",
    alpha: float | None = None,
    text_model_prefix: bool = True,
) -> Path:
    """Write the factors as a LoRA in ``layout``; ``alpha`` None means alpha = rank (scale 1).

    ``path`` is the ``.safetensors`` file (``diffusers``, ``kohya``) or the folder (``peft``; ``diffusers``
    also accepts a folder and writes ``pytorch_lora_weights.safetensors`` in it). ``text_model_prefix`` writes
    text encoder paths under ``text_model.`` as transformers 4 named them.
    """
    path = Path(path)
    text_encoder = text_encoder or {}
    rank = next(iter(unet.values()))[0].shape[0] if unet else next(iter(text_encoder.values()))[0].shape[0]
    te = (lambda p: f"text_model.{p}") if text_model_prefix else (lambda p: p)
    tensors: dict[str, np.ndarray] = {}
    if layout in ("diffusers", "diffusers-processors"):
        if path.suffix != ".safetensors":
            path = path / "pytorch_lora_weights.safetensors"
        for p, (down, up) in unet.items():
            if layout == "diffusers-processors":
                if not p.endswith(ATTENTION):
                    raise ValueError(f"attention processors adapt {ATTENTION} only, not {p}")
                block, proj = (
                    (p.removesuffix(".to_out.0"), "to_out") if p.endswith(".0") else p.rsplit(".", 1)
                )
                key = f"unet.{block}.processor.{proj}_lora"
            else:
                key = f"unet.{p}.lora"
            tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
        for p, (down, up) in text_encoder.items():
            key = f"text_encoder.{te(p)}.lora_linear_layer"
            tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
        metadata = {}
        if alpha is not None:  # diffusers writes the adapters' LoraConfig, prefixed by the model
            packed = {}
            for model, part in (("unet", unet), ("text_encoder", text_encoder)):
                if part:
                    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(part),
                              "init_lora_weights": True}
                    packed |= {f"{model}.{k}": v for k, v in config.items()}
            metadata["lora_adapter_metadata"] = json.dumps(packed)
        return _save(tensors, path, metadata)
    if layout == "kohya":
        for prefix, part, name in (("lora_unet", unet, lambda p: p), ("lora_te", text_encoder, te)):
            for p, (down, up) in part.items():
                key = f"{prefix}_{name(p).replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = np.array(rank if alpha is None else alpha, dtype=np.float32)
        return _save(tensors, path)
    if layout == "peft":
        if text_encoder and unet:
            raise ValueError("a PEFT folder adapts one model: write the UNet and the text encoder separately")
        part = unet or {p if not text_model_prefix else te(p): f for p, f in text_encoder.items()}
        for p, (down, up) in part.items():
            (tensors[f"base_model.model.{p}.lora_A.weight"],
             tensors[f"base_model.model.{p}.lora_B.weight"]) = down, up
        path.mkdir(parents=True, exist_ok=True)
        targets = sorted({p.rsplit(".", 1)[-1] if not p.endswith(".0") else ".".join(p.split(".")[-2:])
                          for p in part})
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank if alpha is None else alpha,
                  "target_modules": targets, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        _save(tensors, path / "adapter_model.safetensors")
        return path
    raise ValueError(f"layout should be one of {LAYOUTS} but is {layout!r}")


def layer_shapes(module, paths) -> dict[str, SlotShape]:
    """The :class:`SlotShape` of each Linear / Conv2d at ``paths`` in a torch ``module`` (a LoRA made before
    the base is exported, e.g. an LCM-LoRA to fuse)."""
    import torch  # noqa: PLC0415

    out = {}
    for path in paths:
        layer = module.get_submodule(path)
        if isinstance(layer, torch.nn.Linear):
            out[path] = SlotShape("linear", layer.in_features, layer.out_features)
        elif isinstance(layer, torch.nn.Conv2d):
            out[path] = SlotShape("conv", layer.in_channels, layer.out_channels, tuple(layer.kernel_size))
        else:
            raise ValueError(f"layer {path!r} is a {type(layer).__name__}, not Linear or Conv2d")
    return out


def lcm_lora_layers(paths) -> list[str]:
    """The UNet layer ``paths`` that the published LCM-LoRA adapts (:data:`LCM_LORA_TARGETS`)."""
    return [p for p in paths if any(p == t or p.endswith("." + t) for t in LCM_LORA_TARGETS)]


def attention_only(shapes: Mapping[str, SlotShape]) -> dict[str, SlotShape]:
    """The attention projections among ``shapes`` (what diffusers' DreamBooth LoRA adapts)."""
    return {p: s for p, s in shapes.items() if p.endswith(ATTENTION) and ".attn" in p}
