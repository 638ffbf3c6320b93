"""Export a diffusers Stable Diffusion 1.x folder (usually a DreamBooth fine-tune) to four ONNX graphs.

``isekai export sd --model FOLDER --repository DIR [--character NAME --prompt ... --negative-prompt ...]``

Graphs (names from :mod:`isekai.constants`; float32, NCHW; B and the sides dynamic):

- ``text_encoder``: ``input_ids`` int32 [B, 77] -> ``last_hidden_state`` [B, 77, D];
- ``unet``: ``sample`` [B, 4, h, w] (h, w multiples of 8), ``timestep`` float32 [B] (one per row: float so
  every scheduler's timesteps fit; the UNet turns them into float sinusoids anyway), ``encoder_hidden_states``
  [B, 77, D] -> ``out_sample`` [B, 4, h, w];
- ``vae_encoder``: ``sample`` [B, 3, H, W] in -1..1 (H, W multiples of 8) -> ``latent_mean``
  [B, 4, H/8, W/8], the latent distribution's mean, unscaled (the loop multiplies by the scaling factor);
- ``vae_decoder``: ``latent_sample`` [B, 4, h, w], already divided by the scaling factor -> ``sample``
  [B, 3, 8h, 8w] in about -1..1.

The UNet and the text encoder also carry LoRA slots (:mod:`isekai.export.lora_slots`): optional inputs with a
rank-0 default, so characters' LoRA adapters run on the one base graph. ``--lcm-lora FILE`` fuses the LCM-LoRA
into the UNet's base weights first (:mod:`isekai.export.fused_lora`) and makes the pipeline run diffusers'
``LCMScheduler`` (4 steps, guidance 1 by default).

Each export ends with onnxruntime parity runs, on the traced shapes and on another batch and size (and, for
the slotted graphs, with random adapters in every slot). Then a character is registered as the repository's
default (:mod:`isekai.export.characters`), with the tokenizer copied beside it, so the server needs neither a
tokenizer download nor a model hub.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import shutil
import sys
from collections.abc import Callable, Collection, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.export import fused_lora, lora_formats, lora_slots
from isekai.export.common import (
    GraphSpec,
    ParityReport,
    check_parity,
    destination,
    export_onnx,
    progress,
    random_like,
)
from isekai.export.sd_attention import head_sliced_self_attention

SD_MODELS = (C.TEXT_ENCODER_MODEL, C.UNET_MODEL, C.VAE_ENCODER_MODEL, C.VAE_DECODER_MODEL)

# Bounds for TensorRT profiles and torch.export: a UNet batch is 2 rows (negative, prompt) per request and
# dynamic batching may stack several requests; the sides cover the SD crop (SD_NATIVE_SIZE long side).
MAX_BATCH = 16
MAX_PIXELS_SIDE = 1024
MIN_PIXELS_SIDE = C.SD_SIZE_MULTIPLE

DEFAULT_PROMPT = "anime style, 1girl, masterpiece, best quality, highly detailed, cel shading, vibrant colors"
DEFAULT_NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, blurry, worst quality, jpeg artifacts, watermark"

# Parity tolerances (onnxruntime vs PyTorch, float32). ORT fuses attention, layer/group norm and GELU and so
# reorders float32 reductions: ~1e-6 relative per op on outputs of O(1); the deep SD 1.5 graphs (12 text
# layers, 16 attention blocks in the UNet, 512-channel group norms in the VAE) accumulate more. An export bug
# (a wrong axis, a specialised shape) shows up as errors of O(0.1..1), far above these. Measured: <=1e-5 on
# the tiny model; on SD 1.5 (random weights) text 3.9e-6, UNet 2.9e-6, VAE encoder 1.2e-6, decoder 8.6e-6.
ATOL = {C.TEXT_ENCODER_MODEL: 1e-4, C.UNET_MODEL: 1e-3, C.VAE_ENCODER_MODEL: 1e-3, C.VAE_DECODER_MODEL: 1e-3}
RTOL = 1e-3


def text_encoder_spec(hidden: int) -> GraphSpec:
    length = C.SD_TOKEN_LENGTH
    return GraphSpec(
        C.TEXT_ENCODER_MODEL,
        inputs={C.TEXT_IN_IDS: ("B", length)},
        outputs={C.TEXT_OUT_HIDDEN: ("B", length, hidden)},
        bounds={"B": (1, MAX_BATCH)},
    )


def unet_spec(hidden: int) -> GraphSpec:
    lo, hi = MIN_PIXELS_SIDE // C.SD_VAE_FACTOR, MAX_PIXELS_SIDE // C.SD_VAE_FACTOR
    return GraphSpec(
        C.UNET_MODEL,
        inputs={
            C.UNET_IN_SAMPLE: ("B", C.SD_LATENT_CHANNELS, "h/8", "w/8"),
            C.UNET_IN_TIMESTEP: ("B",),
            C.UNET_IN_HIDDEN: ("B", C.SD_TOKEN_LENGTH, hidden),
        },
        outputs={C.UNET_OUT_SAMPLE: ("B", C.SD_LATENT_CHANNELS, "h", "w")},
        bounds={"B": (1, MAX_BATCH), "h": (lo, hi), "w": (lo, hi)},
    )


def vae_encoder_spec() -> GraphSpec:
    side = (MIN_PIXELS_SIDE, MAX_PIXELS_SIDE)
    return GraphSpec(
        C.VAE_ENCODER_MODEL,
        inputs={C.VAE_ENC_IN_SAMPLE: ("B", 3, "H/8", "W/8")},
        outputs={C.VAE_ENC_OUT_MEAN: ("B", C.SD_LATENT_CHANNELS, "h", "w")},
        bounds={"B": (1, MAX_BATCH), "H": side, "W": side},
    )


def vae_decoder_spec() -> GraphSpec:
    lo, hi = MIN_PIXELS_SIDE // C.SD_VAE_FACTOR, MAX_PIXELS_SIDE // C.SD_VAE_FACTOR
    return GraphSpec(
        C.VAE_DECODER_MODEL,
        inputs={C.VAE_DEC_IN_LATENT: ("B", C.SD_LATENT_CHANNELS, "h", "w")},
        outputs={C.VAE_DEC_OUT_SAMPLE: ("B", 3, "H", "W")},
        bounds={"B": (1, MAX_BATCH), "h": (lo, hi), "w": (lo, hi)},
    )


# --- export wrappers: positional tensors in, one tensor out (no return_dict, no distributions) --------------


class TextEncoderExport(torch.nn.Module):
    """int32 ids [B, 77] -> last_hidden_state [B, 77, D] (no attention mask: SD 1.x's encoder uses none)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids.long(), return_dict=False)[0]


class UNetExport(torch.nn.Module):
    """(sample [B,4,h,w], timestep float32 [B], encoder_hidden_states [B,77,D]) -> noise [B,4,h,w]."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]


class VaeEncoderExport(torch.nn.Module):
    """sample [B,3,H,W] in -1..1 -> latent mean [B,4,H/8,W/8] (unscaled; no sampling)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0].mean


class VaeDecoderExport(torch.nn.Module):
    """latent_sample [B,4,h,w] (divided by the scaling factor) -> sample [B,3,8h,8w] in about -1..1."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def numpy_callable(module: torch.nn.Module) -> Callable[..., np.ndarray]:
    """An export wrapper as a numpy-in, numpy-out function: the diffusion loop's callables, run by PyTorch."""

    def call(*arrays: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(*(torch.from_numpy(np.asarray(a)) for a in arrays)).numpy()

    return call


# --- loading ------------------------------------------------------------------------------------------------

_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SdModels:
    """A loaded SD 1.x folder, float32 on CPU, in eval mode (``unet``, ``vae`` None when loaded text-only)."""

    folder: Path
    text_encoder: torch.nn.Module
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler_config: dict[str, Any]
    scaling_factor: float  # vae.config.scaling_factor
    unet: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)


def check_sd_folder(folder: str | Path) -> Path:
    """Return ``folder`` if it is a diffusers SD 1.x pipeline folder; else FileNotFoundError or ValueError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a diffusers Stable Diffusion folder: model_index.json is missing")
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index} is not valid JSON: {e}") from e
    missing = [name for name in _REQUIRED if not entries.get(name) or not (folder / name).is_dir()]
    if missing:
        raise ValueError(
            f"{folder} is not a diffusers Stable Diffusion folder: no {', '.join(missing)} "
            f"(model_index.json class {entries.get('_class_name')!r})"
        )
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise ValueError(f"{folder}: scheduler/scheduler_config.json is missing")
    return folder


def load_sd(folder: str | Path, *, text_only: bool = False) -> SdModels:
    """Load an SD 1.x folder from disk only (never by hub name).

    Loads the text encoder, tokenizer and scheduler config, and the UNet and VAE unless ``text_only`` (then
    only the VAE's config is read, for its scaling factor). Weights are upcast to float32 for export.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    folder = check_sd_folder(folder).resolve()
    progress(f"loading {folder}{' (text encoder only)' if text_only else ''}")
    common = dict(local_files_only=True, torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", **common).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
    scheduler_json = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_json.read_text(encoding="utf-8"))
    if text_only:
        unet = vae = None
        vae_config = AutoencoderKL.load_config(str(folder), subfolder="vae", local_files_only=True)
        # A config without the key means the class default, as vae.config.scaling_factor would give.
        default = inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default
        scaling_factor = float(vae_config.get("scaling_factor", default))
    else:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **common).eval()
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **common).eval()
        scaling_factor = float(vae.config.scaling_factor)
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"{folder}: unet cross_attention_dim {unet.config.cross_attention_dim} != text encoder "
                f"hidden size {text_encoder.config.hidden_size} (not an SD 1.x pipeline)"
            )
    return SdModels(folder, text_encoder, tokenizer, scheduler_config, scaling_factor, unet, vae)


# --- fingerprints and pipeline data ------------------------------------------------------------------------

# What each fingerprint covers: the component folder's weight files (and the tokenizer's vocabulary).
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
FINGERPRINT_PARTS = ("tokenizer", "text_encoder", "unet", "vae")


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprints(folder: str | Path) -> dict[str, str]:
    """sha256 of each component of an SD folder: the tokenizer's vocabulary and the weights of the others.

    Two folders whose fingerprints agree for a component hold the same weights for it: a full fine-tune is
    compared with the exported base component by component.
    """
    folder = Path(folder)
    out = {"tokenizer": _hash_files([folder / "tokenizer" / name for name in chars.TOKENIZER_FILES[:2]])}
    for part in FINGERPRINT_PARTS[1:]:
        files = sorted(p for p in (folder / part).iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{folder / part} holds no weights (*.safetensors or *.bin)")
        out[part] = _hash_files(files)
    return out


def base_fingerprint(parts: Mapping[str, str]) -> str:
    """The base model's identity for characters: what their embeddings and adapters depend on, and the LoRA
    fused into the exported UNet (``parts["fused_lora"]``), if any: it changes what every character is drawn
    with."""
    keys = ("tokenizer", "text_encoder", "unet") + (("fused_lora",) if parts.get("fused_lora") else ())
    return hashlib.sha256(json.dumps([parts[p] for p in keys]).encode()).hexdigest()


def architecture(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """A UNet config without the keys that do not change its layers (names, versions), as JSON stores it
    (lists, not tuples), so a config read back from pipeline.json compares equal."""
    return json.loads(json.dumps({k: v for k, v in unet_config.items() if not k.startswith("_")}))


def encode_prompts(models: SdModels, prompts: list[str]) -> np.ndarray:
    """last_hidden_state float32 [N, 77, D] of ``prompts``, tokenized as the diffusers SD pipeline does
    (PyTorch)."""
    ids = models.tokenizer(
        prompts, padding="max_length", max_length=C.SD_TOKEN_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = models.text_encoder(input_ids=ids, return_dict=False)[0]
    return hidden.float().numpy()


def _unet_config(models: SdModels) -> Mapping[str, Any]:
    """The UNet's config: the loaded module's, or read from the folder when only the text encoder was
    loaded."""
    if models.unet is not None:
        return models.unet.config
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    return UNet2DConditionModel.load_config(str(models.folder), subfolder="unet", local_files_only=True)


def write_pipeline_data(
    models: SdModels, repository: Path, lora_targets: str, default: str | None, *,
    scheduler: str = C.DEFAULT_SCHEDULER, fused: Mapping[str, Any] | None = None,
) -> None:
    """Copy the tokenizer files and write pipeline.json (scaling factor, scheduler class and config, D,
    fingerprints, default, the fused LoRA's record from :func:`fused_lora.store` or none)."""
    target = chars.data_dir(repository) / chars.TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    source = models.folder / "tokenizer"
    for name in chars.TOKENIZER_FILES + chars.TOKENIZER_OPTIONAL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
        elif name in chars.TOKENIZER_FILES[:2]:
            raise FileNotFoundError(f"{source / name} is missing: the tokenizer cannot be copied")
    parts = fingerprints(models.folder)
    if fused:
        parts["fused_lora"] = fused["sha256"]
    else:  # a plain export: a LoRA an earlier export fused is no part of this base
        shutil.rmtree(chars.data_dir(repository) / chars.FUSED_LORA_DIR, ignore_errors=True)
    chars.PipelineConfig(
        scaling_factor=models.scaling_factor,
        scheduler_config=models.scheduler_config,
        text_hidden_size=models.text_hidden_size,
        default_character=default,
        fingerprints=parts,
        base_fingerprint=base_fingerprint(parts),
        unet_config=architecture(_unet_config(models)),
        lora_targets=lora_targets,
        scheduler=scheduler,
        fused_lora=dict(fused or {}),
    ).save(repository)


# --- export -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Graph:
    spec: GraphSpec
    module: torch.nn.Module
    sample: Mapping[str, torch.Tensor]  # traced
    check: Mapping[str, torch.Tensor]  # another batch and size, for parity
    slots: Mapping[str, lora_slots.Slot] = field(default_factory=dict)  # LoRA slots; empty for a plain graph
    prefix: str = ""  # the export wrapper's attribute that the slots' buffer names start with
    layers: tuple[str, ...] = ()  # every adaptable layer of the model, recorded in the graph


def _graphs(models: SdModels, lora_targets: str | None, only: Collection[str] = SD_MODELS) -> list[_Graph]:
    """The graphs of ``only`` with their trace and parity inputs; with ``lora_targets``, UNet and text encoder
    get LoRA slots (:mod:`isekai.export.lora_slots`).

    Traced at batch 2 and at sides whose quotients (side / multiple) are not 0 or 1, which torch.export would
    specialise; checked at another batch and size. Latents are small (16x24) so SD 1.5 traces quickly.
    """
    d, length, f = models.text_hidden_size, C.SD_TOKEN_LENGTH, C.SD_VAE_FACTOR
    vocab = int(models.text_encoder.config.vocab_size)
    ids_dtype, time_dtype = getattr(torch, C.TEXT_IDS_DTYPE), getattr(torch, C.UNET_TIMESTEP_DTYPE)

    def ids(batch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, length), generator=g).to(ids_dtype)

    def unet_inputs(batch: int, h: int, w: int, times: tuple[float, ...], seed: int) -> dict[str, Any]:
        return {
            C.UNET_IN_SAMPLE: random_like((batch, C.SD_LATENT_CHANNELS, h, w), seed=seed),
            C.UNET_IN_TIMESTEP: torch.tensor(times, dtype=time_dtype),
            C.UNET_IN_HIDDEN: random_like((batch, length, d), seed=seed + 1),
        }

    def slotted(model: torch.nn.Module, paths: list[str], every: list[str], prefix: str) -> dict[str, Any]:
        if lora_targets is None:
            return {}
        return dict(slots=lora_slots.add_slots(model, paths), prefix=prefix, layers=tuple(every))

    graphs = []
    if C.TEXT_ENCODER_MODEL in only:
        text_layers = lora_slots.text_encoder_layers(models.text_encoder)
        graphs.append(_Graph(
            text_encoder_spec(d), TextEncoderExport(models.text_encoder),
            {C.TEXT_IN_IDS: ids(2, 0)}, {C.TEXT_IN_IDS: ids(1, 1)},
            **slotted(models.text_encoder, text_layers, text_layers, "text_encoder."),
        ))
    if C.UNET_MODEL in only:
        unet_layers = lora_slots.unet_layers(models.unet, "all")
        targets = lora_slots.unet_layers(models.unet, lora_targets) if lora_targets else []
        graphs.append(_Graph(
            unet_spec(d), UNetExport(models.unet),
            unet_inputs(2, 16, 24, (999.0, 500.0), 0), unet_inputs(4, 24, 16, (1.0, 1.0, 981.0, 981.0), 2),
            **slotted(models.unet, targets, unet_layers, "unet."),
        ))
    vae_in, vae_out = C.VAE_ENC_IN_SAMPLE, C.VAE_DEC_IN_LATENT
    if C.VAE_ENCODER_MODEL in only:
        graphs.append(_Graph(
            vae_encoder_spec(), VaeEncoderExport(models.vae),
            {vae_in: random_like((2, 3, 16 * f, 24 * f))},
            {vae_in: random_like((1, 3, 8 * f, 16 * f), seed=1)},
        ))
    if C.VAE_DECODER_MODEL in only:
        graphs.append(_Graph(
            vae_decoder_spec(), VaeDecoderExport(models.vae),
            {vae_out: random_like((2, 4, 16, 24))}, {vae_out: random_like((1, 4, 8, 16), seed=1)},
        ))
    return graphs


def _adapter_parity(graph: _Graph, path: Path, tolerance: Mapping[str, float]) -> ParityReport:
    """The slotted graph with random rank-3 factors in every slot against PyTorch with the same factors."""
    shapes = lora_slots.read_slots(path)
    g = torch.Generator().manual_seed(3)
    factors = {
        p: (torch.randn(s.a_shape(3), generator=g) * 0.02, torch.randn(s.b_shape(3), generator=g) * 0.02)
        for p, s in shapes.items()
    }
    # Slot names are canonical paths; the PyTorch slots are keyed by module path (text_model. under
    # transformers 4).
    by_canonical = {lora_formats.canonical_text_path(p): p for p in graph.slots}
    lora_slots.set_factors(graph.slots, {by_canonical[p]: f for p, f in factors.items()})
    feeds = {p + lora_slots.SLOT_A: a.numpy() for p, (a, _) in factors.items()}
    feeds |= {p + lora_slots.SLOT_B: b.numpy() for p, (_, b) in factors.items()}
    try:
        return check_parity(graph.module, path, graph.check, graph.spec, extra_feeds=feeds, **tolerance)
    finally:
        lora_slots.set_factors(graph.slots, {})


def export_graphs(
    models: SdModels,
    destinations: Mapping[str, Path],
    lora_targets: str | None,
    attention_slicing: str = C.SD_ATTENTION_SLICING,
) -> dict[str, ParityReport]:
    """Export the graphs named in ``destinations`` (model -> file), check each against PyTorch.

    With ``lora_targets`` the UNet and the text encoder get LoRA slots, and their parity is also checked with
    random factors in every slot. ``attention_slicing`` "head" exports the UNet's self-attention one head at
    a time (:mod:`isekai.export.sd_attention`), "none" as diffusers runs it. Returns each graph's parity on
    the inputs it was not traced with.
    """
    if attention_slicing not in C.SD_ATTENTION_SLICINGS:
        raise ValueError(
            f"attention_slicing should be one of {C.SD_ATTENTION_SLICINGS} but is {attention_slicing!r}"
        )
    reports: dict[str, ParityReport] = {}
    for graph in _graphs(models, lora_targets, only=tuple(destinations)):
        model = graph.spec.model
        # The UNet's self-attention one head at a time (export/sd_attention.py): the served unet's activation
        # peak falls by ~1.5 GB at a 448x512 crop; parity below runs against diffusers' own processors.
        slicing = head_sliced_self_attention(graph.module) if attention_slicing == "head" else nullcontext(0)
        with slicing as sliced:
            path = export_onnx(graph.module, graph.spec, graph.sample, destinations[model])
        if sliced:
            progress(f"{model}: {sliced} self-attention blocks exported one head at a time")
        if graph.slots:
            rename = lora_formats.canonical_text_path if model == C.TEXT_ENCODER_MODEL else None
            count = lora_slots.open_slots(path, graph.prefix, graph.layers, lora_targets, rename)
            progress(f"{model}: {count} LoRA slots ({lora_targets if model == C.UNET_MODEL else 'all'} "
                     "layers)")
            lora_slots.set_factors(graph.slots, {})  # rank 0: the plain base model
        tolerance = dict(atol=ATOL[model], rtol=RTOL)
        check_parity(graph.module, path, graph.sample, graph.spec, **tolerance)
        reports[model] = check_parity(graph.module, path, graph.check, graph.spec, **tolerance)
        if graph.slots:
            progress(f"{model}: parity with random rank-3 adapters in every slot")
            _adapter_parity(graph, path, tolerance)
    return reports


def export_sd(
    model_folder: str | Path,
    repository: str | Path | None = None,
    output_dir: str | Path | None = None,
    character: str | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    lora_targets: str = C.DEFAULT_LORA_TARGETS,
    lcm_lora: str | Path | None = None,
    attention_slicing: str = C.SD_ATTENTION_SLICING,
) -> dict[str, ParityReport]:
    """Export text_encoder, unet, vae_encoder, vae_decoder; check each against PyTorch; register a character.

    With ``repository`` the graphs go to ``<repository>/<model>/1/model.onnx`` and a character is registered
    as the repository's default: ``character`` with ``prompt``, or, without ``character``,
    :data:`constants.DEFAULT_CHARACTER` with a generic anime prompt. Characters registered on another base
    model before are reported (they are refused until registered again). With ``output_dir`` the graphs go to
    ``<output_dir>/<model>.onnx`` and no character is registered. The UNet and text encoder carry LoRA slots
    for ``lora_targets`` (see :mod:`isekai.export.lora_slots`). With ``lcm_lora`` (an LCM-LoRA file or folder,
    any layout :mod:`isekai.export.lora_formats` reads) the LoRA is fused into the UNet's weights before
    export and the repository's pipeline runs diffusers' ``LCMScheduler`` (:mod:`isekai.export.fused_lora`).
    ``attention_slicing``: see :func:`export_graphs`. Returns each graph's parity on the inputs it was not
    traced with.
    """
    if (repository is None) == (output_dir is None):
        raise ValueError("give exactly one of repository (a Triton repository) or output_dir")
    if lora_targets not in C.LORA_TARGET_FAMILIES:
        raise ValueError(f"lora_targets should be one of {C.LORA_TARGET_FAMILIES} but is {lora_targets!r}")
    if character is not None:
        chars.check_character_name(character)
        if prompt is None:
            raise ValueError(f"character {character!r} needs a prompt (--prompt)")
    models = load_sd(model_folder)
    fused = None
    if lcm_lora is not None:
        fused = fused_lora.read_unet_lora(lcm_lora, models.unet, models.text_encoder)
        fused_lora.fuse(models.unet, fused)
        ranks = "/".join(map(str, sorted({layer.rank for layer in fused.unet.values()})))
        progress(f"unet: {Path(lcm_lora).name} ({fused.layout}, rank {ranks}) fused into {len(fused.unet)} "
                 "layers")
    destinations = {
        model: destination(model, repository, Path(output_dir) / f"{model}.onnx" if output_dir else None)
        for model in SD_MODELS
    }
    reports = export_graphs(models, destinations, lora_targets, attention_slicing)
    if repository is not None:
        from isekai.export.characters import add_prompt_character, report_stale  # noqa: PLC0415

        if character is None:
            character = C.DEFAULT_CHARACTER
            prompt = DEFAULT_PROMPT if prompt is None else prompt
            negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        repository = Path(repository)
        record = fused_lora.store(lcm_lora, fused, repository) if fused is not None else None
        scheduler = C.LCM_SCHEDULER if fused is not None else C.DEFAULT_SCHEDULER
        write_pipeline_data(models, repository, lora_targets, default=None, scheduler=scheduler, fused=record)
        add_prompt_character(repository, character, prompt, negative_prompt or "", default=True)
        report_stale(repository)
    return reports


# --- command line -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=Path,
        help="diffusers Stable Diffusion 1.x folder (model_index.json, unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/), e.g. a DreamBooth output folder",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--repository", type=Path,
        help="Triton model repository: writes <DIR>/<model>/1/model.onnx for text_encoder, unet, vae_encoder "
        "and vae_decoder, and registers a character under <DIR>/diffusion/",
    )
    where.add_argument(
        "--output", type=Path, help="folder for the four graphs as <model>.onnx; registers no character"
    )
    parser.add_argument(
        "--character", default=None,
        help=f"register this character (name pattern {C.CHARACTER_NAME_PATTERN}) as the repository's "
        f"default. Without it, {C.DEFAULT_CHARACTER!r} gets a generic anime prompt and becomes the default",
    )
    parser.add_argument(
        "--prompt", default=None,
        help='the character\'s prompt, e.g. "a photo of sks girl, anime style" (required with --character)',
    )
    parser.add_argument(
        "--negative-prompt", default=None,
        help="the character's negative prompt (default: empty with --character, a generic one otherwise)",
    )


    parser.add_argument(
        "--lcm-lora", type=Path, default=None,
        help="an LCM-LoRA for SD 1.5 (e.g. latent-consistency/lcm-lora-sdv1-5's "
        "pytorch_lora_weights.safetensors: kohya or diffusers layout): fused into the UNet's weights before "
        f"export; the pipeline then samples with diffusers' LCMScheduler ({C.LCM_STEPS} steps, guidance "
        f"{C.LCM_GUIDANCE:g} by default). Characters' LoRAs still apply on top",
    )
    parser.add_argument(
        "--lora-targets", default=C.DEFAULT_LORA_TARGETS, choices=C.LORA_TARGET_FAMILIES,
        help="which UNet layers get LoRA slots for characters' LoRAs: attention (to_q/k/v/out), transformer "
        "(+ proj_in/out, feed-forward: kohya LoRA), all (+ every conv: LoCon, LCM-LoRA); "
        f"default {C.DEFAULT_LORA_TARGETS}",
    )
    parser.add_argument(
        "--attention-slicing", default=C.SD_ATTENTION_SLICING, choices=C.SD_ATTENTION_SLICINGS,
        help="the UNet's self-attention: head exports it one head at a time (the same numbers, score "
        "buffers heads x smaller: ~1.5 GB less at SD 1.5's 512 crops), none as diffusers runs it (every head "
        "at once); "
        f"default {C.SD_ATTENTION_SLICING}",
    )


def main(args: argparse.Namespace) -> int:
    try:
        check_sd_folder(args.model)
        if args.character is not None:
            chars.check_character_name(args.character)
            if args.prompt is None:
                raise ValueError(f"--character {args.character} needs --prompt")
        reports = export_sd(
            args.model,
            repository=args.repository,
            output_dir=args.output,
            character=args.character,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            lora_targets=args.lora_targets,
            lcm_lora=args.lcm_lora,
            attention_slicing=args.attention_slicing,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"isekai export sd: error: {e}", file=sys.stderr)
        return 2
    for report in reports.values():
        print(report)
    return 0
