"""Characters of a repository: register, list, remove, pick the default (``isekai character ...``).

One base Stable Diffusion model per repository (``isekai export sd``) draws every character, in one of three
ways (layout on disk in :mod:`isekai.ensemble.characters`):

- ``prompt``: the base model with the character's own prompt (``isekai character add NAME --prompt ...``);
- ``lora``: the base model plus the character's LoRA (``--lora FILE``, any layout of
  :mod:`isekai.export.lora_formats`): its UNet LoRA becomes an onnxruntime adapter for the base graph's slots,
  applied per request on the one base UNet, and its text-encoder LoRA is applied to the prompt embeddings
  computed here (and kept as an adapter for prompt overrides);
- ``full``: a DreamBooth full fine-tune (``--model FOLDER``, a diffusers SD 1.x folder on the base's
  architecture): its UNet is exported as the character's own graph, loaded by the server on first use and
  unloaded least-recently-used under a memory budget; its text encoder too, if it differs from the base's.

Prompt embeddings are computed with the exported text_encoder graph and the repository's tokenizer, so
registering a prompt or LoRA character needs only the repository, not the checkpoint it was exported from.
Everything is checked before anything is written, and a character folder is swapped in whole: a failed
registration leaves the repository exactly as it was, and a running server sees the character at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.export import adapters, lora_formats, lora_slots
from isekai.export.common import ort_session, progress


@dataclass(frozen=True)
class Base:
    """The exported base model, as registration needs it: read from the repository, no checkpoint needed."""

    repository: Path
    config: chars.PipelineConfig
    slots: Mapping[str, Mapping[str, lora_slots.SlotShape]]  # model -> slot path -> shape
    layers: Mapping[str, Sequence[str]]  # model -> every adaptable layer path (slotted or not)

    @classmethod
    def load(cls, repository: str | Path) -> Base:
        repository = Path(repository)
        config = chars.PipelineConfig.load(repository)
        slots, layers = {}, {}
        for model in chars.CHARACTER_MODELS:
            graph = graph_path(repository, model)
            if not graph.is_file():
                raise FileNotFoundError(f"{graph} is missing: run "
                                        f"`isekai export sd --repository {repository}` first")
            slots[model] = lora_slots.read_slots(graph)
            layers[model] = lora_slots.graph_layers(graph)[0]
        return cls(repository, config, slots, layers)


def graph_path(repository: Path, model: str) -> Path:
    return Path(repository) / model / C.MODEL_VERSION / C.ONNX_FILENAME


def check_prompts(prompt: str, negative_prompt: str) -> None:
    for label, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if not isinstance(text, str):
            raise ValueError(f"{label} should be text but is {type(text).__name__}")
        if len(text) > C.MAX_PROMPT_CHARS:
            raise ValueError(f"{label} should be at most {C.MAX_PROMPT_CHARS} characters but has {len(text)}")
    if not prompt.strip():
        raise ValueError("a character needs a prompt (--prompt), e.g. \"a photo of sks girl, anime style\"")


def encode_prompts(
    repository: Path,
    prompts: Sequence[str],
    adapter: Mapping[str, np.ndarray] | None = None,
    graph: Path | None = None,
) -> np.ndarray:
    """last_hidden_state float32 [N, 77, D] of ``prompts`` by the exported text encoder (or ``graph``), with
    ``adapter``'s factors in its LoRA slots; tokenized by the repository's tokenizer as the server does."""
    tokenizer = chars.Tokenizer.from_repository(repository)
    ids = np.concatenate([tokenizer(p) for p in prompts])
    session = ort_session(graph or graph_path(repository, C.TEXT_ENCODER_MODEL))
    feeds = {C.TEXT_IN_IDS: ids, **(adapter or {})}
    return np.ascontiguousarray(session.run([C.TEXT_OUT_HIDDEN], feeds)[0], dtype=np.float32)


def _check_new(repository: Path, name: str, replace: bool) -> None:
    chars.check_character_name(name)
    if not replace and (chars.characters_dir(repository) / name / chars.CHARACTER_FILE).is_file():
        raise ValueError(f"character {name!r} is already registered in {repository}: give --replace to "
                         "replace it, or remove it first")


def _finish(repository: Path, base: Base, character: chars.Character, files: Mapping[str, Path], default: bool
            ) -> Path:
    folder = chars.write_character(repository, character, base.config.base_fingerprint, files)
    if default or not base.config.default_character:
        set_default(repository, character.name)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    progress(f"character {character.name!r} ({character.kind}) registered in {folder} ({size / 1e6:.1f} MB)")
    return folder


def add_prompt_character(
    repository: str | Path, name: str, prompt: str, negative_prompt: str = "", *, default: bool = False,
    replace: bool = True,
) -> Path:
    """Register ``name``: the base model with ``prompt`` (and ``negative_prompt``). Returns its folder."""
    repository = Path(repository)
    _check_new(repository, name, replace)
    check_prompts(prompt, negative_prompt)
    base = Base.load(repository)
    # row 0 unconditional, as the loop wants
    embeddings = encode_prompts(repository, [negative_prompt, prompt])
    character = chars.Character(name, prompt, negative_prompt, embeddings, kind="prompt", source="prompt")
    return _finish(repository, base, character, {}, default)


def add_lora_character(
    repository: str | Path, name: str, lora: str | Path, prompt: str, negative_prompt: str = "", *,
    default: bool = False, replace: bool = False,
) -> Path:
    """Register ``name``: the base model with the LoRA at ``lora`` (file or folder) and ``prompt``.

    The UNet LoRA becomes ``unet.onnx_adapter`` (scale folded in, every shape checked against the base's
    slots); a text-encoder LoRA is applied to the prompt embeddings and kept as ``text_encoder.onnx_adapter``
    for prompt overrides. Refuses, before writing anything, a file it cannot read, a LoRA for another base,
    and a LoRA adapting layers the base graph has no slot for.
    """
    repository = Path(repository)
    _check_new(repository, name, replace)
    check_prompts(prompt, negative_prompt)
    base = Base.load(repository)
    found = lora_formats.read_lora(lora, base.layers)
    if not found.unet and not found.text_encoder:
        raise ValueError(f"{lora} adapts no layer of the UNet or the text encoder")
    params = {
        model: adapters.adapter_params(layers, base.slots[model], model)
        for model, layers in ((C.UNET_MODEL, found.unet), (C.TEXT_ENCODER_MODEL, found.text_encoder))
        if layers
    }
    embeddings = encode_prompts(repository, [negative_prompt, prompt], params.get(C.TEXT_ENCODER_MODEL))
    ranks = sorted({layer.rank for part in (found.unet, found.text_encoder) for layer in part.values()})
    source = (f"{Path(lora).name} ({found.layout}; rank {'/'.join(map(str, ranks))}; {len(found.unet)} UNet "
              f"and {len(found.text_encoder)} text encoder layers)")
    with tempfile.TemporaryDirectory(dir=_staging(repository), prefix=".staging-") as tmp:
        files = {
            f"{model}{chars.ADAPTER_SUFFIX}": adapters.write_adapter(
                p, Path(tmp) / f"{model}{chars.ADAPTER_SUFFIX}"
            )
            for model, p in params.items()
        }
        character = chars.Character(name, prompt, negative_prompt, embeddings, kind="lora",
                                    weights=dict.fromkeys(params, "adapter"), source=source)
        return _finish(repository, base, character, files, default)


def _staging(repository: Path) -> Path:
    """A folder on the characters' filesystem for files being made (so moving them in is a rename)."""
    folder = chars.characters_dir(repository)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def add_full_character(
    repository: str | Path, name: str, model_folder: str | Path, prompt: str, negative_prompt: str = "", *,
    default: bool = False, replace: bool = False,
) -> Path:
    """Register ``name``: a full fine-tune (a diffusers SD 1.x folder on the base's architecture) with
    ``prompt``.

    Its UNet is exported as the character's own graph; its text encoder too if its weights differ from the
    base's (the prompt embeddings always come from its own text encoder). Its tokenizer and VAE must be the
    base's: the server has one VAE and one tokenizer per repository.
    """
    from isekai.export import sd  # noqa: PLC0415  (torch and diffusers, only for full fine-tunes)

    repository = Path(repository)
    _check_new(repository, name, replace)
    check_prompts(prompt, negative_prompt)
    base = Base.load(repository)
    folder = sd.check_sd_folder(model_folder)
    parts = sd.fingerprints(folder)
    for part, why in (("tokenizer", "prompts are tokenized by the base's tokenizer"),
                      ("vae", "the server decodes every character with the base's VAE")):
        if parts[part] != base.config.fingerprints.get(part):
            raise ValueError(f"{folder}: its {part} differs from the exported base model's ({why}): copy the "
                             f"base model's {part}/ folder into it, or export it as the base with "
                             "`isekai export sd`")
    own = [m for m, part in ((C.UNET_MODEL, "unet"), (C.TEXT_ENCODER_MODEL, "text_encoder"))
           if parts[part] != base.config.fingerprints.get(part)]
    if not own:
        raise ValueError(f"{folder} has the base model's own UNet and text encoder: register it with "
                         "--prompt only")
    models = sd.load_sd(folder, text_only=C.UNET_MODEL not in own)
    if models.unet is not None and sd.architecture(models.unet.config) != dict(base.config.unet_config):
        raise ValueError(f"{folder}: its UNet's architecture differs from the exported base model's (another "
                         "SD version?); a full fine-tune must keep the base's layers")
    # An LCM repository: the fine-tune's own UNet gets the LCM-LoRA fused too, as the base's did.
    if models.unet is not None and base.config.fused_lora:
        from isekai.export import fused_lora  # noqa: PLC0415

        fused_lora.fuse_stored(repository, base.config.fused_lora, models.unet, models.text_encoder)
    with tempfile.TemporaryDirectory(dir=_staging(repository), prefix=".staging-") as tmp:
        destinations = {model: Path(tmp) / model / C.ONNX_FILENAME for model in own}
        sd.export_graphs(models, destinations, lora_targets=None)
        text_graph = destinations.get(C.TEXT_ENCODER_MODEL)
        embeddings = encode_prompts(repository, [negative_prompt, prompt], graph=text_graph)
        files = {}
        for model, path in destinations.items():
            for f in path.parent.iterdir():  # model.onnx and its external data
                files[f"{model}/{f.name}"] = f
        character = chars.Character(name, prompt, negative_prompt, embeddings, kind="full",
                                    weights=dict.fromkeys(own, "graph"),
                                    source=f"{folder.name} (own {' and '.join(own)})")
        return _finish(repository, base, character, files, default)


def remove_character(repository: str | Path, name: str) -> None:
    """Remove ``name`` (not the default: make another the default first)."""
    repository = Path(repository)
    config = chars.PipelineConfig.load(repository)
    if config.default_character == name:
        raise ValueError(f"{name!r} is the default character of {repository}: make another one the default "
                         "first (isekai character default OTHER)")
    chars.remove_character_folder(repository, name)
    progress(f"character {name!r} removed from {repository}")


def set_default(repository: str | Path, name: str) -> None:
    """Make ``name`` (registered and drawable by the exported base) the repository's default character."""
    repository = Path(repository)
    chars.CharacterStore(repository).get(name)  # raises if unknown or made for another base
    config = chars.PipelineConfig.load(repository)
    fields = {f: getattr(config, f) for f in config.__dataclass_fields__}
    chars.PipelineConfig(**{**fields, "default_character": name}).save(repository)


def report_stale(repository: str | Path) -> list[str]:
    """Print (and return) the characters that the exported base can no longer draw, and why."""
    stale = [info for info in chars.CharacterStore(repository).infos() if info.problem]
    for info in stale:
        progress(f"character {info.name!r} cannot be drawn: {info.problem}")
    return [info.name for info in stale]


# --- command line -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def repo(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repository", type=Path, required=True,
                       help="the Triton model repository (isekai export sd)")

    add = sub.add_parser("add", help="register a character (prompt, LoRA or full fine-tune)")
    add.add_argument("name", help=f"the character's name ({C.CHARACTER_NAME_PATTERN})")
    weights = add.add_mutually_exclusive_group()
    weights.add_argument("--lora", type=Path, help="a LoRA: diffusers .safetensors, a PEFT folder, or kohya")
    weights.add_argument("--model", type=Path, help="a full fine-tune: a diffusers SD 1.x folder on the base")
    add.add_argument("--prompt", required=True, help='its prompt, e.g. "a photo of sks girl, anime style"')
    add.add_argument("--negative-prompt", default="", help="its negative prompt (default: none)")
    add.add_argument("--default", action="store_true", help="make it the repository's default character")
    add.add_argument("--replace", action="store_true", help="replace a character of the same name")
    repo(add)

    listing = sub.add_parser("list", help="the registered characters: name, kind, prompt, default, bytes")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    repo(listing)

    remove = sub.add_parser("remove", help="remove a character (a running server stops offering it at once)")
    remove.add_argument("name", help="the character to remove")
    repo(remove)

    default = sub.add_parser("default", help="make a character the default (requests without `character`)")
    default.add_argument("name", help="the character to make the default")
    repo(default)

    train = sub.add_parser("train", help="train a DreamBooth LoRA from 8-10 photos, then register it")
    train.add_argument("name", help=f"the character's name ({C.CHARACTER_NAME_PATTERN})")
    train.add_argument("--negative-prompt", default="",
                       help="the character's negative prompt (default: none)")
    train.add_argument("--default", action="store_true", help="make it the repository's default character")
    train.add_argument("--replace", action="store_true", help="replace a character of the same name")
    repo(train)
    from isekai.export import train_lora  # noqa: PLC0415

    train_lora.add_arguments(train)


def _print_table(infos: list[chars.CharacterInfo]) -> None:
    rows = [("name", "kind", "default", "MB", "prompt")]
    for info in infos:
        prompt = info.prompt if len(info.prompt) <= 60 else info.prompt[:57] + "..."
        if info.problem:
            prompt = f"CANNOT BE DRAWN: {info.problem}"
        rows.append((info.name, info.kind, "yes" if info.default else "", f"{info.bytes / 1e6:.1f}", prompt))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "add":
            kwargs = dict(default=args.default, replace=args.replace)
            if args.lora is not None:
                add_lora_character(args.repository, args.name, args.lora, args.prompt, args.negative_prompt,
                                   **kwargs)
            elif args.model is not None:
                add_full_character(args.repository, args.name, args.model, args.prompt, args.negative_prompt,
                                   **kwargs)
            else:
                add_prompt_character(args.repository, args.name, args.prompt, args.negative_prompt, **kwargs)
        elif args.action == "list":
            infos = chars.CharacterStore(args.repository).infos()
            if args.json:
                print(json.dumps([i.as_dict() for i in infos], indent=2, ensure_ascii=False))
            else:
                _print_table(infos)
        elif args.action == "remove":
            remove_character(args.repository, args.name)
        elif args.action == "default":
            set_default(args.repository, args.name)
        elif args.action == "train":
            return _train(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"isekai character {args.action}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _train(args: argparse.Namespace) -> int:
    from isekai.export import sd, train_lora  # noqa: PLC0415

    repository = Path(args.repository)
    _check_new(repository, args.name, args.replace)
    check_prompts(args.prompt, args.negative_prompt)
    base = Base.load(repository)
    parts = sd.fingerprints(sd.check_sd_folder(args.base))
    # The folder's own weights (an LCM repository also fused its LCM-LoRA into the exported UNet: a LoRA
    # trained on the plain base is what it stacks with).
    if any(parts[p] != base.config.fingerprints.get(p) for p in ("tokenizer", "text_encoder", "unet")):
        raise ValueError(f"{args.base} is not the base model exported in {repository}: a LoRA trained on it "
                         "would be drawn by another UNet (give --base the folder the repository was exported "
                         "from)")
    lora = train_lora.train_dreambooth_lora(args.base, args.images, args.prompt, args.output,
                                            train_lora.options_from_args(args), resume=args.resume)
    add_lora_character(repository, args.name, lora, args.prompt, args.negative_prompt, default=args.default,
                       replace=args.replace)
    return 0
