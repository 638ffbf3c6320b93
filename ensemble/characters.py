"""Registered characters and the diffusion model's data: what the server reads instead of the model hub.

``isekai export sd`` and ``isekai character add|train`` (:mod:`isekai.export.characters`) write, in the
``diffusion`` model's folder of the Triton repository::

    <repository>/diffusion/
        pipeline.json           format (2), scaling_factor (the VAE's config value), scheduler_config (the
                                model folder's scheduler/scheduler_config.json, verbatim), text_hidden_size D,
                                token_length (77), default_character, fingerprints (per component),
                                base_fingerprint, unet_config (the base UNet's architecture), lora_targets,
                                scheduler (the diffusers class the loop runs: DPMSolverMultistepScheduler, or
                                LCMScheduler after --lcm-lora), fused_lora (a LoRA fused into the base UNet's
                                weights, or absent)
        fused_lora/             that LoRA as it was given (full fine-tunes registered later get it fused too)
        tokenizer/              the model folder's CLIP tokenizer files, for prompt overrides
        characters/<NAME>/
            character.json      name, kind, prompt, negative_prompt, revision, base_fingerprint, weights,
                                source
            embeddings.npy      float32 [2, 77, D]: row 0 the negative (unconditional) prompt's
                                last_hidden_state, row 1 the prompt's, as the character's own text encoder
                                gives them
            unet.onnx_adapter   a LoRA character: its UNet LoRA for the base graph's slots (onnxruntime
                                adapter)
            text_encoder.onnx_adapter   ... and its text-encoder LoRA, if it has one (prompt overrides use it)
            unet/model.onnx     a full fine-tune: its own UNet graph (and text_encoder/model.onnx if its text
                                encoder differs from the base's)

A character is one of three kinds: ``prompt`` (the base model with its own prompt), ``lora`` (the base model
plus its adapters, applied per request on the one base UNet) and ``full`` (its own UNet graph, loaded on first
use). ``weights`` maps each model with weights of its own to ``"adapter"`` or ``"graph"``.

``base_fingerprint`` identifies the exported base model (text encoder, tokenizer and UNet weights): a
character registered on another base is refused by name instead of being drawn by the wrong UNet. ``revision``
changes whenever a character is written, so the models of one request never mix two versions of it: a request
names the character as ``NAME@REVISION`` (:attr:`Character.key`) to the models that run its weights.

Triton treats only numeric folders of a model as versions, so these folders sit beside ``1/`` untouched.
A character folder is written whole under a hidden temporary name and renamed into place, so a running server
never reads half a character, and a failed registration leaves nothing behind.

Nothing here needs torch or Triton; :class:`Tokenizer` imports ``transformers`` (tokenizers only) when built.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isekai import constants as C

PIPELINE_FILE = "pipeline.json"
TOKENIZER_DIR = "tokenizer"
CHARACTERS_DIR = "characters"
FUSED_LORA_DIR = "fused_lora"
CHARACTER_FILE = "character.json"
EMBEDDINGS_FILE = "embeddings.npy"
ADAPTER_SUFFIX = ".onnx_adapter"
# The CLIP tokenizer files SD 1.x folders ship (tokenizer.json and added_tokens.json are copied when present).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
TOKENIZER_OPTIONAL_FILES = ("tokenizer.json", "added_tokens.json")
FORMAT_VERSION = 2
KINDS = ("prompt", "lora", "full")
# The models a character may bring weights of its own for (the ones whose graphs the diffusion model calls
# with the character's key).
CHARACTER_MODELS = (C.UNET_MODEL, C.TEXT_ENCODER_MODEL)
WEIGHT_FORMS = ("adapter", "graph")
KEY_SEPARATOR = "@"


_NAME = re.compile(C.CHARACTER_NAME_PATTERN)


class CharacterChanged(RuntimeError):
    """A character was removed or registered again while a request that uses it ran (not the caller's
    fault)."""


def data_dir(repository: str | Path) -> Path:
    """``<repository>/diffusion``: where the diffusion model's characters, tokenizer and pipeline.json live.

    Triton gives a Python model its own folder (``args["model_repository"]``); that folder's parent is the
    repository this takes.
    """
    return Path(repository) / C.DIFFUSION_MODEL


def characters_dir(repository: str | Path) -> Path:
    return data_dir(repository) / CHARACTERS_DIR


def check_character_name(name: str) -> str:
    """Return ``name`` if it is a valid character name, else raise ValueError (names become folder names)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"character name should match {C.CHARACTER_NAME_PATTERN} (letters, digits, '_', '.', '-'; "
            f"at most 64) but is {name!r}"
        )
    return name


def plan_path(folder: Path, model: str) -> Path:
    """Where a character keeps its TensorRT plan of ``model`` (``isekai export tensorrt`` builds it)."""
    return Path(folder) / f"{model}.plan"


def weights_path(folder: Path, model: str, form: str) -> Path:
    """Where a character folder keeps ``model``'s own weights: ``<model>.onnx_adapter`` or
    ``<model>/model.onnx``."""
    if form == "adapter":
        return folder / f"{model}{ADAPTER_SUFFIX}"
    if form == "graph":
        return folder / model / C.ONNX_FILENAME
    raise ValueError(f"weights form should be one of {WEIGHT_FORMS} but is {form!r}")


@dataclass(frozen=True)
class Character:
    """A registered character: its prompts, their precomputed text embeddings, and which weights it brings.

    ``embeddings`` is float32 [2, 77, D]: row 0 is the negative (unconditional) prompt, row 1 the prompt, the
    order classifier-free guidance batches them in. ``weights`` maps a model name (``unet``, ``text_encoder``)
    to ``"adapter"`` or ``"graph"`` for each model the character has weights of its own for.
    """

    name: str
    prompt: str
    negative_prompt: str
    embeddings: np.ndarray = field(repr=False)
    kind: str = "prompt"
    revision: str = ""
    weights: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def key(self) -> str:
        """``NAME@REVISION``: how a request names this very version of the character to the models."""
        return f"{self.name}{KEY_SEPARATOR}{self.revision}"


def parse_key(key: str) -> tuple[str, str]:
    """``(name, revision)`` of a :attr:`Character.key`; ValueError for anything else."""
    name, sep, revision = key.partition(KEY_SEPARATOR)
    if not sep or not revision.isalnum():
        raise ValueError(f"character key should be NAME{KEY_SEPARATOR}REVISION but is {key!r}")
    return check_character_name(name), revision


@dataclass(frozen=True)
class PipelineConfig:
    """What the diffusion loop needs from the exported model's folder, read from ``pipeline.json``."""

    scaling_factor: float  # the VAE's latent scaling (vae.config.scaling_factor)
    scheduler_config: Mapping[str, Any]  # the model folder's scheduler_config.json, for Scheduler.from_config
    text_hidden_size: int  # D of the text embeddings and of the UNet's encoder_hidden_states
    token_length: int = C.SD_TOKEN_LENGTH
    default_character: str | None = None
    # sha256 of the exported folder's tokenizer, text_encoder, unet and vae weights (export/sd.py:
    # fingerprints)
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    base_fingerprint: str = ""  # the base as characters depend on it: tokenizer, text encoder and UNet
    unet_config: Mapping[str, Any] = field(default_factory=dict)  # the base UNet's config.json (architecture)
    lora_targets: str = ""  # which UNet layers have LoRA slots (constants.LORA_TARGET_FAMILIES)
    # The diffusers scheduler class the loop builds from scheduler_config; steps and guidance default to its
    # constants.SCHEDULER_DEFAULTS. Repositories exported before LCM support have none: DPM-Solver++.
    scheduler: str = C.DEFAULT_SCHEDULER
    # A LoRA fused into the exported UNet's base weights (the LCM-LoRA): {"file": its copy under fused_lora/,
    # "sha256", "layout", "layers", "purpose"}; empty when none. Its sha256 is part of base_fingerprint.
    fused_lora: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sampling_defaults(self) -> tuple[int, float]:
        """(steps, guidance) a request that leaves them out gets: the exported scheduler's."""
        return C.SCHEDULER_DEFAULTS.get(self.scheduler, C.SCHEDULER_DEFAULTS[C.DEFAULT_SCHEDULER])

    @classmethod
    def load(cls, repository: str | Path) -> PipelineConfig:
        path = data_dir(repository) / PIPELINE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run `isekai export sd --repository {repository}` first"
            )
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format {raw.get('format')!r} is not {FORMAT_VERSION} (made by an older isekai): "
                f"run `isekai export sd --model ... --repository {repository}` again"
            )
        return cls(
            scaling_factor=float(raw["scaling_factor"]),
            scheduler_config=dict(raw["scheduler_config"]),
            text_hidden_size=int(raw["text_hidden_size"]),
            token_length=int(raw["token_length"]),
            default_character=raw.get("default_character"),
            fingerprints=dict(raw.get("fingerprints") or {}),
            base_fingerprint=str(raw.get("base_fingerprint", "")),
            unet_config=dict(raw.get("unet_config") or {}),
            lora_targets=str(raw.get("lora_targets", "")),
            scheduler=str(raw.get("scheduler") or C.DEFAULT_SCHEDULER),
            fused_lora=dict(raw.get("fused_lora") or {}),
        )

    def save(self, repository: str | Path) -> Path:
        raw = {
            "format": FORMAT_VERSION,
            "scaling_factor": self.scaling_factor,
            "scheduler_config": dict(self.scheduler_config),
            "text_hidden_size": self.text_hidden_size,
            "token_length": self.token_length,
            "default_character": self.default_character,
            "fingerprints": dict(self.fingerprints),
            "base_fingerprint": self.base_fingerprint,
            "unet_config": dict(self.unet_config),
            "lora_targets": self.lora_targets,
            "scheduler": self.scheduler,
            "fused_lora": dict(self.fused_lora),
        }
        path = data_dir(repository) / PIPELINE_FILE
        atomic_write(path, json.dumps(raw, indent=2).encode("utf-8"))
        return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _npy_bytes(array: np.ndarray) -> bytes:
    import io  # noqa: PLC0415

    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _check_embeddings(emb: Any) -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim != 3 or emb.shape[0] != 2 or emb.dtype != np.float32:
        raise ValueError(f"embeddings should be float32 [2, 77, D] but are {emb.dtype} {list(emb.shape)}")
    return emb


def write_character(
    repository: str | Path,
    character: Character,
    base_fingerprint: str,
    files: Mapping[str, Path] | None = None,
    *,
    replace: bool = True,
) -> Path:
    """Write ``character`` as ``<repository>/diffusion/characters/<name>/`` in one step; return that folder.

    ``files`` maps names inside the folder (``unet.onnx_adapter``, ``unet/model.onnx``, ...) to files that are
    moved in. Everything is written into a hidden temporary folder first and renamed into place; on any error
    the temporary folder goes and the repository is as it was. ``replace=False`` refuses a name already
    registered. The character gets a fresh revision.
    """
    check_character_name(character.name)
    if character.kind not in KINDS:
        raise ValueError(f"character kind should be one of {KINDS} but is {character.kind!r}")
    emb = _check_embeddings(character.embeddings)
    for model, form in character.weights.items():
        if model not in CHARACTER_MODELS or form not in WEIGHT_FORMS:
            raise ValueError(f"character weights should map {CHARACTER_MODELS} to {WEIGHT_FORMS}, not "
                             f"{model}: {form}")
    root = characters_dir(repository)
    target = root / character.name
    if target.exists() and not replace:
        raise ValueError(f"character {character.name!r} is already registered in {root} (remove it first)")
    root.mkdir(parents=True, exist_ok=True)
    revision = secrets.token_hex(6)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{character.name}-"))
    try:
        for relative, source in (files or {}).items():
            dest = tmp / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), dest)
        (tmp / EMBEDDINGS_FILE).write_bytes(_npy_bytes(emb))
        meta = {
            "name": character.name,
            "kind": character.kind,
            "prompt": character.prompt,
            "negative_prompt": character.negative_prompt,
            "revision": revision,
            "base_fingerprint": base_fingerprint,
            "weights": dict(character.weights),
            "source": character.source,
        }
        (tmp / CHARACTER_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        for model, form in character.weights.items():
            if not weights_path(tmp, model, form).is_file():
                raise ValueError(f"character {character.name!r}: its {model} {form} file is missing")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is renamed aside first and deleted after."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{secrets.token_hex(4)}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_character_folder(repository: str | Path, name: str) -> None:
    """Delete a character's folder: renamed aside (out of the store's sight at once), then deleted."""
    check_character_name(name)
    target = characters_dir(repository) / name
    if not (target / CHARACTER_FILE).is_file():
        raise ValueError(f"character {name!r} is not registered in {characters_dir(repository)}")
    aside = target.with_name(f".removed-{name}-{secrets.token_hex(4)}")
    os.rename(target, aside)
    shutil.rmtree(aside, ignore_errors=True)


@dataclass(frozen=True)
class CharacterInfo:
    """What ``isekai character list`` and the server's character list show of one character."""

    name: str
    kind: str
    prompt: str
    negative_prompt: str
    default: bool
    bytes: int
    revision: str
    source: str
    problem: str | None  # why it cannot be drawn (registered on another base, damaged), or None
    # What a swap that leaves steps and guidance out gets: the exported scheduler's defaults (the same for
    # every character of a repository; listed here so a client learns them from the one call it makes
    # anyway). None when the repository has no exported base.
    steps: int | None = None
    guidance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class CharacterStore:
    """The characters registered in a Triton repository (layout in the module docstring).

    Every :meth:`get` checks the character against the exported base (fingerprint, embeddings' shape) and
    reads its files again whenever they change, so characters registered, replaced or removed while the server
    runs are seen at once, and a re-exported base turns the characters of the old one away by name.
    """

    def __init__(self, repository_dir: str | Path):
        self.repository = Path(repository_dir)
        self.directory = characters_dir(self.repository)
        self._cache: dict[str, tuple[tuple[int, int, int], Character, str]] = {}
        self._tokenizer: tuple[tuple, Tokenizer] | None = None

    def tokenizer(self) -> Tokenizer:
        """The repository's tokenizer, read again whenever its files change (a re-export replaces them)."""
        data = data_dir(self.repository)
        files = [data / TOKENIZER_DIR / name for name in TOKENIZER_FILES] + [data / PIPELINE_FILE]
        stamp = tuple((f.stat().st_ino, f.stat().st_mtime_ns) if f.is_file() else None for f in files)
        if self._tokenizer is None or self._tokenizer[0] != stamp:
            self._tokenizer = (stamp, Tokenizer.from_repository(self.repository))
        return self._tokenizer[1]

    @property
    def config(self) -> PipelineConfig:
        """The pipeline config (read on each access: a re-export can change the default character)."""
        return PipelineConfig.load(self.repository)

    def names(self) -> list[str]:
        """Registered character names, sorted (hidden folders of writes in progress are not characters)."""
        if not self.directory.is_dir():
            return []
        return sorted(
            p.name for p in self.directory.iterdir()
            if not p.name.startswith(".") and (p / CHARACTER_FILE).is_file()
        )

    def get(self, name: str | None = None) -> Character:
        """The character ``name``; ``None`` or ``""`` means the repository's default character.

        Raises ValueError for an unknown or invalid name, and for a character that does not fit the exported
        base (registered on another base model, or embeddings of another shape).
        """
        config = self.config
        if not name:
            if not config.default_character:
                raise ValueError(f"no default character in {data_dir(self.repository) / PIPELINE_FILE}: "
                                 "register one with `isekai character add NAME ... --default`")
            name = config.default_character
        check_character_name(name)
        folder = self.directory / name
        meta_path, emb_path = folder / CHARACTER_FILE, folder / EMBEDDINGS_FILE
        try:
            # A character is written as a new folder, so its files' inodes change with every registration.
            meta_stat, emb_stat = meta_path.stat(), emb_path.stat()
        except FileNotFoundError:
            known = ", ".join(self.names()) or "(none)"
            raise ValueError(f"character {name!r} is not registered; known: {known}") from None
        stamp = (meta_stat.st_ino, meta_stat.st_mtime_ns, emb_stat.st_ino)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            character, base = cached[1], cached[2]
        else:
            character, base = self._read(folder)
            self._cache[name] = (stamp, character, base)
        self._check(character, base, config)
        return character

    def _read(self, folder: Path) -> tuple[Character, str]:
        meta = json.loads((folder / CHARACTER_FILE).read_text(encoding="utf-8"))
        embeddings = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False)
        character = Character(
            name=meta["name"], prompt=meta["prompt"], negative_prompt=meta.get("negative_prompt", ""),
            embeddings=embeddings, kind=meta.get("kind", "prompt"), revision=str(meta.get("revision", "")),
            weights=dict(meta.get("weights") or {}), source=str(meta.get("source", "")),
        )
        return character, str(meta.get("base_fingerprint", ""))

    def _check(self, character: Character, base: str, config: PipelineConfig) -> None:
        if base != config.base_fingerprint:
            raise ValueError(
                f"character {character.name!r} was registered on another base model than the one exported in "
                f"{self.repository} (base {base[:12] or '?'} vs {config.base_fingerprint[:12]}); register it "
                "again with `isekai character add`, or remove it"
            )
        want = (2, config.token_length, config.text_hidden_size)
        emb = character.embeddings
        if emb.shape != want or emb.dtype != np.float32:
            raise ValueError(
                f"character {character.name!r}: embeddings are {emb.dtype} {list(emb.shape)}, "
                f"expected float32 {list(want)}"
            )

    def infos(self) -> list[CharacterInfo]:
        """Every registered character with its kind, prompt, size and, if it cannot be drawn, why."""
        try:
            config: PipelineConfig | None = self.config
        except (FileNotFoundError, ValueError):
            config = None
        steps, guidance = config.sampling_defaults if config is not None else (None, None)
        out = []
        for name in self.names():
            folder = self.directory / name
            try:
                character, base = self._read(folder)
            except Exception as err:  # noqa: BLE001 - a damaged folder must not hide the other characters
                character, base = Character(name, "", "", np.zeros((0,), np.float32), kind="?"), ""
                problem: str | None = f"unreadable: {err}"
            else:
                problem = "the repository has no exported base model" if config is None else None
                if config is not None:
                    try:
                        self._check(character, base, config)
                    except ValueError as err:
                        problem = str(err)
            out.append(CharacterInfo(
                name=name, kind=character.kind, prompt=character.prompt,
                negative_prompt=character.negative_prompt,
                default=config is not None and config.default_character == name, bytes=_folder_bytes(folder),
                revision=character.revision, source=character.source, problem=problem,
                steps=steps, guidance=guidance,
            ))
        return out

    def weights_of(self, key: str, model: str) -> tuple[str, Path] | None:
        """``(form, path)`` of the weights the character ``key`` (``NAME@REVISION``) brings for ``model``.

        None when it brings none (the base graph serves it as it is). :class:`CharacterChanged` when the
        character was removed or written again since ``key`` was handed out (its revision changed); ValueError
        for a malformed key.
        """
        name, revision = parse_key(key)
        folder = self.directory / name
        try:
            meta = json.loads((folder / CHARACTER_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CharacterChanged(
                f"character {name!r} is not registered (removed while the request ran?)"
            ) from None
        if meta.get("revision") != revision:
            raise CharacterChanged(f"character {name!r} was registered again while this request ran "
                             f"(revision {revision} is gone; now {meta.get('revision')})")
        form = (meta.get("weights") or {}).get(model)
        return None if form is None else (form, weights_path(folder, model, form))


class Tokenizer:
    """The exported model's CLIP tokenizer, loaded offline from ``<repository>/diffusion/tokenizer``.

    Tokenizes like the diffusers SD pipeline: ``<|startoftext|>``, the prompt's tokens, ``<|endoftext|>``,
    padded with the pad token and truncated to 77 (the last kept token is then ``<|endoftext|>``).
    """

    def __init__(self, directory: str | Path, token_length: int = C.SD_TOKEN_LENGTH):
        from transformers import CLIPTokenizer  # noqa: PLC0415  (only prompt overrides need it)

        directory = Path(directory)
        missing = [f for f in TOKENIZER_FILES[:2] if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"tokenizer files {missing} are missing in {directory}")
        self.token_length = token_length
        self._tokenizer = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)

    @classmethod
    def from_repository(cls, repository: str | Path) -> Tokenizer:
        config = PipelineConfig.load(repository)
        return cls(data_dir(repository) / TOKENIZER_DIR, config.token_length)

    def __call__(self, prompt: str) -> np.ndarray:
        """Token ids of ``prompt``: [1, 77] of dtype ``constants.TEXT_IDS_DTYPE`` (the text_encoder input)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt should be a str but is {type(prompt).__name__}")
        ids = self._tokenizer(
            [prompt], padding="max_length", max_length=self.token_length, truncation=True, return_tensors="np"
        ).input_ids
        return ids.astype(C.TEXT_IDS_DTYPE)


def text_embeddings(
    character: Character,
    prompt: str | None,
    tokenizer: Tokenizer | None,
    encode: Any,
) -> np.ndarray:
    """Classifier-free guidance's ``[negative, prompt]`` embeddings, float32 [2, 77, D].

    Without a ``prompt`` of its own the request uses the character's precomputed embeddings (no text encoder
    call). With one, the character's negative prompt and ``prompt`` are tokenized and run through ``encode``
    (``input_ids`` [2, 77] -> ``last_hidden_state`` [2, 77, D], the text_encoder model) as one batch.
    """
    if not prompt:
        return character.embeddings
    if tokenizer is None:
        raise ValueError("a prompt override needs the exported tokenizer (diffusion/tokenizer); export sd "
                         "again")
    ids = np.concatenate([tokenizer(character.negative_prompt), tokenizer(prompt)])
    hidden = np.asarray(encode(ids), dtype=np.float32)
    if hidden.shape[:2] != ids.shape or hidden.shape[2:] != character.embeddings.shape[2:]:
        raise ValueError(f"text_encoder returned {list(hidden.shape)}, expected [2, {ids.shape[1]}, "
                         f"{character.embeddings.shape[2]}]")
    return hidden
