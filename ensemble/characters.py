"""Registered characters and the diffusion model's data: what the server reads instead of the model hub.

``isekai export sd`` (see :func:`isekai.export.sd.register_character`) writes, in the ``diffusion`` model's
folder of the Triton repository::

    <repository>/diffusion/
        pipeline.json           format (1), scaling_factor (the VAE's config value), scheduler_config (the
                                model folder's scheduler/scheduler_config.json, verbatim), text_hidden_size D,
                                token_length (77), default_character, text_fingerprint
        tokenizer/              the model folder's CLIP tokenizer files (vocab.json, merges.txt,
                                special_tokens_map.json, tokenizer_config.json), for prompt overrides
        characters/<NAME>/
            character.json      name, prompt, negative_prompt, text_fingerprint
            embeddings.npy      float32 [2, 77, D]: row 0 the negative (unconditional) prompt's
                                last_hidden_state, row 1 the prompt's, as the text_encoder graph gives them

Triton treats only numeric folders of a model as versions, so these folders sit beside ``1/`` untouched.
``text_fingerprint`` identifies the text encoder and tokenizer that made the embeddings: a character
registered with another model's text encoder is refused instead of steering the UNet with foreign embeddings.
Files are replaced atomically, so a running server never reads half a character.

Nothing here needs torch or Triton; :class:`Tokenizer` imports ``transformers`` (tokenizers only) when built.
"""

from __future__ import annotations

import json
import os
import re
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
CHARACTER_FILE = "character.json"
EMBEDDINGS_FILE = "embeddings.npy"
# The CLIP tokenizer files SD 1.x folders ship (tokenizer.json and added_tokens.json are copied when present).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
TOKENIZER_OPTIONAL_FILES = ("tokenizer.json", "added_tokens.json")
FORMAT_VERSION = 1

_NAME = re.compile(C.CHARACTER_NAME_PATTERN)


def data_dir(repository: str | Path) -> Path:
    """``<repository>/diffusion``: where the diffusion model's characters, tokenizer and pipeline.json live.

    Triton gives a Python model its own folder (``args["model_repository"]``); that folder's parent is the
    repository this takes.
    """
    return Path(repository) / C.DIFFUSION_MODEL


def check_character_name(name: str) -> str:
    """Return ``name`` if it is a valid character name, else raise ValueError (names become folder names)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"character name should match {C.CHARACTER_NAME_PATTERN} (letters, digits, '_', '.', '-'; "
            f"at most 64) but is {name!r}"
        )
    return name


@dataclass(frozen=True)
class Character:
    """A registered character: its prompts and their precomputed text embeddings.

    ``embeddings`` is float32 [2, 77, D]: row 0 is the negative (unconditional) prompt, row 1 the prompt, the
    order classifier-free guidance batches them in.
    """

    name: str
    prompt: str
    negative_prompt: str
    embeddings: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class PipelineConfig:
    """What the diffusion loop needs from the exported model's folder, read from ``pipeline.json``."""

    scaling_factor: float  # the VAE's latent scaling (vae.config.scaling_factor)
    scheduler_config: Mapping[str, Any]  # the model folder's scheduler_config.json, for Scheduler.from_config
    text_hidden_size: int  # D of the text embeddings and of the UNet's encoder_hidden_states
    token_length: int = C.SD_TOKEN_LENGTH
    default_character: str | None = None
    text_fingerprint: str = ""

    @classmethod
    def load(cls, repository: str | Path) -> PipelineConfig:
        path = data_dir(repository) / PIPELINE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run `isekai export sd --repository {repository}` first"
            )
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: format {raw.get('format')!r} is not {FORMAT_VERSION}; export again")
        return cls(
            scaling_factor=float(raw["scaling_factor"]),
            scheduler_config=dict(raw["scheduler_config"]),
            text_hidden_size=int(raw["text_hidden_size"]),
            token_length=int(raw["token_length"]),
            default_character=raw.get("default_character"),
            text_fingerprint=str(raw.get("text_fingerprint", "")),
        )

    def save(self, repository: str | Path) -> Path:
        raw = {
            "format": FORMAT_VERSION,
            "scaling_factor": self.scaling_factor,
            "scheduler_config": dict(self.scheduler_config),
            "text_hidden_size": self.text_hidden_size,
            "token_length": self.token_length,
            "default_character": self.default_character,
            "text_fingerprint": self.text_fingerprint,
        }
        path = data_dir(repository) / PIPELINE_FILE
        _atomic_write(path, json.dumps(raw, indent=2).encode("utf-8"))
        return path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_character(repository: str | Path, character: Character, text_fingerprint: str) -> Path:
    """Write ``character`` under ``<repository>/diffusion/characters/<name>/``; return that folder.

    ``character.embeddings`` must be float32 [2, 77, D]. The embeddings are written before character.json, so
    a reader that finds the json finds matching embeddings.
    """
    check_character_name(character.name)
    emb = np.asarray(character.embeddings)
    if emb.ndim != 3 or emb.shape[0] != 2 or emb.dtype != np.float32:
        raise ValueError(f"embeddings should be float32 [2, 77, D] but are {emb.dtype} {list(emb.shape)}")
    folder = data_dir(repository) / CHARACTERS_DIR / character.name
    folder.mkdir(parents=True, exist_ok=True)
    buffer = _npy_bytes(emb)
    _atomic_write(folder / EMBEDDINGS_FILE, buffer)
    meta = {
        "name": character.name,
        "prompt": character.prompt,
        "negative_prompt": character.negative_prompt,
        "text_fingerprint": text_fingerprint,
    }
    _atomic_write(folder / CHARACTER_FILE, json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8"))
    return folder


def _npy_bytes(array: np.ndarray) -> bytes:
    import io  # noqa: PLC0415

    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


class CharacterStore:
    """The characters registered in a Triton repository (layout in the module docstring).

    ``get`` reads a character from disk the first time and again whenever its files change, so characters
    registered while the server runs are picked up without a restart.
    """

    def __init__(self, repository_dir: str | Path):
        self.repository = Path(repository_dir)
        self.directory = data_dir(self.repository) / CHARACTERS_DIR
        self._cache: dict[str, tuple[tuple[int, int], Character]] = {}

    @property
    def config(self) -> PipelineConfig:
        """The pipeline config (read on each access: a re-export can change the default character)."""
        return PipelineConfig.load(self.repository)

    def names(self) -> list[str]:
        """Registered character names, sorted."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if (p / CHARACTER_FILE).is_file())

    def get(self, name: str | None = None) -> Character:
        """The character ``name``; ``None`` or ``""`` means the repository's default character.

        Raises ValueError for an unknown or invalid name, and for a character whose embeddings do not fit the
        exported text encoder (another model's fingerprint, or a shape other than [2, 77, D]).
        """
        config = self.config
        if not name:
            if not config.default_character:
                raise ValueError(f"no default character in {data_dir(self.repository) / PIPELINE_FILE}")
            name = config.default_character
        check_character_name(name)
        folder = self.directory / name
        meta_path, emb_path = folder / CHARACTER_FILE, folder / EMBEDDINGS_FILE
        if not meta_path.is_file() or not emb_path.is_file():
            known = ", ".join(self.names()) or "(none)"
            raise ValueError(f"character {name!r} is not registered; known: {known}")
        stamp = (meta_path.stat().st_mtime_ns, emb_path.stat().st_mtime_ns)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("text_fingerprint") != config.text_fingerprint:
            raise ValueError(
                f"character {name!r} was registered with another text encoder than the exported one; "
                f"register it again with the exported model folder"
            )
        embeddings = np.load(emb_path, allow_pickle=False)
        want = (2, config.token_length, config.text_hidden_size)
        if embeddings.shape != want or embeddings.dtype != np.float32:
            raise ValueError(
                f"character {name!r}: embeddings are {embeddings.dtype} {list(embeddings.shape)}, "
                f"expected float32 {list(want)}"
            )
        character = Character(name, meta["prompt"], meta.get("negative_prompt", ""), embeddings)
        self._cache[name] = (stamp, character)
        return character


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
        raise ValueError("a prompt override needs the exported tokenizer (diffusion/tokenizer); export sd again")
    ids = np.concatenate([tokenizer(character.negative_prompt), tokenizer(prompt)])
    hidden = np.asarray(encode(ids), dtype=np.float32)
    if hidden.shape[:2] != ids.shape or hidden.shape[2:] != character.embeddings.shape[2:]:
        raise ValueError(f"text_encoder returned {list(hidden.shape)}, expected [2, {ids.shape[1]}, "
                         f"{character.embeddings.shape[2]}]")
    return hidden
