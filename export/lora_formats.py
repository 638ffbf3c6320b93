"""Read a LoRA in any of the layouts people bring, into one form: per layer, its down and up factors and
scale.

Layouts (what the trainers of this field write):

- **diffusers** (``train_dreambooth_lora.py`` -> ``pytorch_lora_weights.safetensors``):
  ``unet.<path>.lora.down.weight`` / ``.lora.up.weight`` (or PEFT's ``.lora_A.weight`` / ``.lora_B.weight``
  under the same prefix), text encoder ``text_encoder.<path>.lora_linear_layer.down.weight`` / ``.up.weight``
  (``<path>`` under ``text_model.`` when made with transformers 4); the older attention-processor form
  ``<block>.processor.to_q_lora.down.weight``. The scale is ``lora_alpha / r`` from the
  ``lora_adapter_metadata`` in the file's header, ``<path>.alpha`` keys (``network_alphas``), else 1, exactly
  as diffusers' ``load_lora_weights`` reads it;
- **PEFT** folders: ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
  ``alpha_pattern``) + ``adapter_model.safetensors`` with ``base_model.model.<path>.lora_A.weight`` /
  ``lora_B``;
- **kohya** (sd-scripts, LCM-LoRA): ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, text encoder ``lora_te_<path>``; the scale is ``alpha / rank`` (alpha defaults to the rank).

Factors keep their layer's layout: a Linear layer's down is [r, in] and up [out, r]; a Conv2d layer's down is
[r, in, kh, kw] and up [out, r, 1, 1]. Only safetensors files are read: a pickle (``.bin``, ``.pt``,
``.ckpt``) can run code when loaded, so it is refused with a message saying so. Anything else that does not
fit — a truncated file, an unknown key, a LoRA for another architecture (SDXL, SD 2.x), a layer with only one
factor — raises ``ValueError`` naming the file and the key. Nothing is written anywhere.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNET = "unet"
TEXT_ENCODER = "text_encoder"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# LyCORIS and DoRA variants: not a plain low-rank product, so they have no place in a LoRA slot.
_UNSUPPORTED = {
    ".hada_w1_a": "LoHa (LyCORIS)", ".lokr_w1": "LoKr (LyCORIS)", ".lokr_w1_a": "LoKr (LyCORIS)",
    ".lora_mid.weight": "LoCon with a Tucker core (LyCORIS)", ".dora_scale": "DoRA",
    ".lora_magnitude_vector": "DoRA", ".diff": "a full weight difference (LyCORIS 'full')",
    ".oft_blocks": "OFT", ".w_norm": "GLoRA",
}


@dataclass(frozen=True)
class LoraLayer:
    """One layer's LoRA: ``delta W = scale * up @ down`` (for a conv, ``up`` is a 1x1 conv after ``down``).

    ``down``: float32 [r, in] (Linear) or [r, in, kh, kw] (Conv2d); ``up``: float32 [out, r] or
    [out, r, 1, 1].
    """

    down: np.ndarray
    up: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class Lora:
    """A LoRA file read into module paths of the diffusers UNet and the transformers CLIP text encoder."""

    source: Path
    layout: str  # "diffusers", "diffusers attention processors", "peft" or "kohya"
    unet: Mapping[str, LoraLayer]
    text_encoder: Mapping[str, LoraLayer]

    def nbytes(self) -> int:
        return sum(
            x.down.nbytes + x.up.nbytes for part in (self.unet, self.text_encoder) for x in part.values()
        )


class _Factors:
    """Collects (model, path) -> down / up / alpha while keys are read, remembering each factor's key."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.parts: dict[tuple[str, str], dict[str, object]] = {}

    def add(self, model: str, path: str, what: str, key: str, value: np.ndarray | float) -> None:
        entry = self.parts.setdefault((model, path), {})
        if what in entry:
            raise ValueError(f"{self.source}: key {key!r} gives the {what} of {model} layer {path!r} twice")
        entry[what] = value
        entry.setdefault("keys", []).append(key)  # type: ignore[union-attr]

    def layers(self, scale_of) -> dict[str, dict[str, LoraLayer]]:
        out: dict[str, dict[str, LoraLayer]] = {UNET: {}, TEXT_ENCODER: {}}
        for (model, path), entry in self.parts.items():
            keys = entry["keys"]
            for need in ("down", "up"):
                if need not in entry:
                    raise ValueError(f"{self.source}: {model} layer {path!r} has no {need} factor (its keys: "
                                     f"{keys})")
            down, up = np.asarray(entry["down"]), np.asarray(entry["up"])
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
                raise ValueError(
                    f"{self.source}: {model} layer {path!r}: down {list(down.shape)} and up {list(up.shape)} "
                    "are not the factors of one LoRA (down [r, in(, kh, kw)], up [out, r(, 1, 1)]); keys "
                    f"{keys}"
                )
            rank = int(down.shape[0])
            alpha = entry.get("alpha")
            out[model][path] = LoraLayer(down, up, scale_of(model, path, rank, alpha))
        return out


# ------------------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------------------
def _refuse_pickle(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte header length, then the JSON header; torch.save: a zip, or a bare pickle (0x80
    # proto).
    safetensors_like = head[8:9] == b"{"
    pickled = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"
    if path.suffix.lower() in _PICKLE_SUFFIXES or (pickled and not safetensors_like):
        raise ValueError(
            f"{path} is a PyTorch pickle: loading one can run code, so isekai reads LoRA weights from "
            ".safetensors only. Convert it where you trust the file, e.g. python -c \"import torch, "
            f"safetensors.torch as s; s.save_file(torch.load('{path.name}', weights_only=True), "
            "'lora.safetensors')\""
        )


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as float32 numpy arrays, and its header metadata."""
    import torch  # noqa: PLC0415  (bf16 tensors need torch to become float32)
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {
                key: f.get_tensor(key).to(torch.float32).numpy()
                for key in f.keys()  # noqa: SIM118 - safe_open is not iterable: keys() is how it lists them
            }
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or damaged?): {err}"
        ) from None
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors, metadata


def read_lora(path: str | Path, layers: Mapping[str, Collection[str]]) -> Lora:
    """Read the LoRA at ``path`` (a file, a PEFT folder, or a folder holding
    ``pytorch_lora_weights.safetensors``).

    ``layers`` lists the module paths of the base model's adaptable layers, ``{"unet": [...],
    "text_encoder": [...]}``: kohya's underscored names are resolved against them, and a key naming a layer
    the base does not have is refused here (shape checks against the base come when the adapter is built).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA {path} does not exist")
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return _read_peft(path, layers)
        if (path / DIFFUSERS_WEIGHTS).is_file():
            path = path / DIFFUSERS_WEIGHTS
        else:
            raise ValueError(
                f"{path} is a folder without {PEFT_CONFIG} (a PEFT adapter) or {DIFFUSERS_WEIGHTS} "
                "(diffusers)"
            )
    tensors, metadata = read_safetensors(path)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors):
        return _read_kohya(path, tensors, layers)
    return _read_diffusers(path, tensors, metadata, layers)


# ------------------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------------------
def _check_supported(source: Path, key: str) -> None:
    for marker, what in _UNSUPPORTED.items():
        if key.endswith(marker) or f"{marker}." in key:
            raise ValueError(f"{source}: key {key!r} is {what}, not a plain LoRA; isekai serves LoRA "
                             "(down/up) only")


def canonical_text_path(path: str) -> str:
    """A text encoder module path without transformers 4's ``text_model.`` level (transformers 5 has none)."""
    return path.removeprefix("text_model.")


def _known(source: Path, model: str, path: str, key: str, layers: Mapping[str, Collection[str]]) -> str:
    if path not in layers.get(model, ()):
        hint = ""
        if model == UNET and ("input_blocks" in path or "output_blocks" in path or "middle_block" in path):
            hint = " (original-SD 'input_blocks' naming: convert it to diffusers names first)"
        elif model == UNET and ("add_embedding" in path or "transformer_blocks.2" in path):
            hint = " (an SDXL LoRA? isekai serves SD 1.x bases)"
        raise ValueError(f"{source}: key {key!r} targets {model} layer {path!r}, which the base model does "
                         f"not have{hint}")
    return path


_DIFFUSERS_FACTOR = re.compile(
    r"^(?:(?P<model>unet|text_encoder|text_encoder_2|transformer)\.)?(?P<path>.+?)\."
    r"(?P<what>lora\.down\.weight|lora\.up\.weight|lora_A\.weight|lora_B\.weight|lora_linear_layer\.down\.weight|"
    r"lora_linear_layer\.up\.weight|lora_A\.default\.weight|lora_B\.default\.weight|alpha|down\.weight|up\.weight)$"
)
_PROCESSOR = re.compile(r"^(?P<block>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora$")


def _read_diffusers(
    source: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
    layers: Mapping[str, Collection[str]]
) -> Lora:
    config = json.loads(metadata[METADATA_KEY]) if metadata.get(METADATA_KEY) else {}
    factors = _Factors(source)
    layout = "diffusers"
    for key, value in tensors.items():
        _check_supported(source, key)
        match = _DIFFUSERS_FACTOR.match(key)
        if match is None:
            raise ValueError(f"{source}: unknown key {key!r} (not a LoRA factor in diffusers, PEFT or kohya "
                             "layout)")
        model = match["model"] or UNET
        if model in ("text_encoder_2", "transformer"):
            raise ValueError(f"{source}: key {key!r} belongs to {model} (an SDXL / DiT LoRA); isekai serves "
                             "SD 1.x")
        path = match["path"]
        processor = _PROCESSOR.match(path)
        if processor is None and match["what"] in ("down.weight", "up.weight"):
            raise ValueError(f"{source}: unknown key {key!r} (not a LoRA factor in diffusers, PEFT or kohya "
                             "layout)")
        if processor is not None:  # diffusers' attention-processor LoRA (before the PEFT backend)
            layout = "diffusers attention processors"
            path = (f"{processor['block']}.{processor['proj']}"
                    + (".0" if processor["proj"] == "to_out" else ""))
        if model == TEXT_ENCODER:
            path = canonical_text_path(path)
        path = _known(source, model, path, key, layers)
        what = match["what"]
        if what == "alpha":
            factors.add(model, path, "alpha", key, float(np.asarray(value).reshape(-1)[0]))
        else:
            factors.add(model, path, "down" if ("down" in what or "lora_A" in what) else "up", key, value)

    def scale(model: str, path: str, rank: int, alpha: float | None) -> float:
        if alpha is not None:  # network_alphas, as diffusers reads kohya-converted files
            return alpha / rank
        return _peft_scale(
            {k.removeprefix(model + "."): v for k, v in config.items() if k.startswith(model + ".")},
            path,
            rank,
        )

    found = factors.layers(scale)
    return Lora(source, layout, found[UNET], found[TEXT_ENCODER])


def _pattern_value(patterns: Mapping[str, object], path: str) -> object | None:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path it ends (or fully
    regex-matches)."""
    for pattern, value in patterns.items():
        if path == pattern or path.endswith("." + pattern) or re.fullmatch(rf"(.*\.)?{pattern}", path):
            return value
    return None


def _peft_scale(config: Mapping[str, object], path: str, rank: int) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA), per-layer patterns first; without a config alpha = rank."""
    if config.get("use_dora"):
        raise ValueError("DoRA adapters are not plain LoRA; isekai serves LoRA (down/up) only")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path)
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
    alpha = float(alpha)  # type: ignore[arg-type]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_peft(folder: Path, layers: Mapping[str, Collection[str]]) -> Lora:
    config_path = folder / PEFT_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        pickled = folder / "adapter_model.bin"
        if pickled.is_file():
            _refuse_pickle(pickled)
        raise ValueError(f"{folder} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    tensors, _ = read_safetensors(weights)
    factors = _Factors(weights)
    model = None
    for key, value in tensors.items():
        _check_supported(weights, key)
        match = re.match(
            r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<what>lora_A|lora_B)(?:\.default)?\.weight$", key
        )
        if match is None:
            raise ValueError(f"{weights}: unknown key {key!r} (PEFT keys end in .lora_A.weight / "
                             ".lora_B.weight)")
        path = match["path"]
        # One PEFT folder adapts one model: the UNet or the text encoder, told apart by the layers it names.
        owner = UNET if path in layers.get(UNET, ()) else TEXT_ENCODER
        if owner == TEXT_ENCODER:
            path = _known(weights, TEXT_ENCODER, canonical_text_path(path), key, layers)
        if model is not None and owner != model:
            raise ValueError(f"{weights}: key {key!r} adapts the {owner} while others adapt the {model}")
        model = owner
        factors.add(owner, path, "down" if match["what"] == "lora_A" else "up", key, value)

    def scale(model: str, path: str, rank: int, alpha: float | None) -> float:
        want = _pattern_value(config.get("rank_pattern") or {}, path) or config.get("r")
        if want is not None and int(want) != rank:  # type: ignore[call-overload]
            raise ValueError(f"{weights}: {model} layer {path!r} has rank {rank} but {PEFT_CONFIG} says "
                             f"{want}")
        return _peft_scale(config, path, rank)

    found = factors.layers(scale)
    return Lora(folder, "peft", found[UNET], found[TEXT_ENCODER])


_KOHYA = re.compile(
    r"^lora_(?P<model>unet|te|te1|te2)_(?P<name>.+?)\.(?P<what>lora_down\.weight|lora_up\.weight|alpha)$"
)


def _read_kohya(source: Path, tensors: Mapping[str, np.ndarray],
                layers: Mapping[str, Collection[str]]) -> Lora:
    by_name = {
        UNET: {p.replace(".", "_"): p for p in layers.get(UNET, ())},
        TEXT_ENCODER: {p.replace(".", "_"): p for p in layers.get(TEXT_ENCODER, ())},
    }
    factors = _Factors(source)
    for key, value in tensors.items():
        _check_supported(source, key)
        match = _KOHYA.match(key)
        if match is None:
            raise ValueError(f"{source}: unknown key {key!r} (kohya keys are "
                             "lora_unet_/lora_te_<layer>.lora_down.weight, .lora_up.weight, .alpha)")
        if match["model"] in ("te1", "te2"):
            raise ValueError(f"{source}: key {key!r} names SDXL's second text encoder; isekai serves SD 1.x "
                             "bases")
        model = UNET if match["model"] == "unet" else TEXT_ENCODER
        name = match["name"].removeprefix("text_model_") if model == TEXT_ENCODER else match["name"]
        path = by_name[model].get(name)
        if path is None:
            _known(source, model, name, key, layers)  # raises with a hint
        what = match["what"]
        if what == "alpha":
            factors.add(model, path, "alpha", key, float(np.asarray(value).reshape(-1)[0]))
        else:
            factors.add(model, path, "down" if what.startswith("lora_down") else "up", key, value)

    def scale(model: str, path: str, rank: int, alpha: float | None) -> float:
        return (rank if alpha is None else alpha) / rank

    found = factors.layers(scale)
    return Lora(source, "kohya", found[UNET], found[TEXT_ENCODER])
