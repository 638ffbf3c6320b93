"""Write a diffusers Stable Diffusion 1.x folder with random weights, in the layout DreamBooth training saves.

DreamBooth's training script ends with ``StableDiffusionPipeline(...).save_pretrained(output_dir)``; this
module builds the same pipeline object from fresh random modules and saves it the same way, so the exporter
reads exactly the on-disk format a user brings::

    model_index.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    text_encoder/{config.json, model.safetensors}
    tokenizer/{vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json}
    scheduler/scheduler_config.json          (PNDM, as SD 1.5 ships)

Sizes: ``"tiny"`` keeps the SD 1.5 block structure (four UNet levels, VAE factor 8, 77 token positions) with a
few channels, for CI; ``"sd15"`` is the real SD 1.5 architecture (UNet 860M parameters, VAE 84M, CLIP ViT-L/14
text encoder 123M), for benchmarks: random weights cost the same to run as trained ones.

The tokenizer cannot come from a hub here, so :func:`build_clip_bpe` makes a small but valid CLIP byte-level
BPE vocabulary (the 256 byte symbols, their ``</w>`` word-final forms, merges learned from a built-in list of
prompt words, then ``<|startoftext|>`` and ``<|endoftext|>`` last, as in CLIP's own vocabulary).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Literal

import torch

from isekai import constants as C

Size = Literal["tiny", "sd15"]
SIZES: tuple[str, ...] = ("tiny", "sd15")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_VOCAB_SIZE = 49408  # CLIP ViT-L/14's vocabulary, as SD 1.5's text_encoder/config.json states

# Words the tiny tokenizer learns whole (character prompts and the usual negative prompt); anything else
# still tokenizes, byte by byte, as with any byte-level BPE.
_CORPUS = """
a an the of in on with and at by to for from is wearing holding standing sitting looking smiling
photo picture portrait illustration painting drawing render artwork character person people man woman
girl boy sks anime manga style cartoon cel shading studio ghibli makoto shinkai key visual
masterpiece best quality high highly detailed detail sharp focus beautiful cute colorful vibrant soft
lighting light hair eyes face smile dress shirt jacket school uniform kimono hat long short blue red
green black white pink silver golden blonde brown purple background scene city street sky night day
lowres low bad anatomy hands fingers extra missing blurry blur worst normal jpeg artifacts signature
watermark text error cropped ugly deformed disfigured duplicate mutated realistic photorealistic 3d
""".split()  # noqa: SIM905 - a word list reads and edits better as text



def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes 0..255 (GPT-2/CLIP's mapping), in byte order.

    Printable Latin-1 bytes stand for themselves; the others are moved to code points 256 and up so that no
    symbol is whitespace or a control character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def build_clip_bpe(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary and merge list learned from ``words`` (default: a built-in prompt corpus).

    Returns ``(vocab, merges)``: ``vocab`` maps token -> id in CLIP's order (bytes, bytes + ``</w>``, merge
    results in merge order, ``<|startoftext|>``, ``<|endoftext|>``); ``merges`` are the symbol pairs in
    priority order. Training is greedy on pair counts with ties broken alphabetically, so it is deterministic.
    """
    symbols = byte_symbols()
    encode = {b: s for b, s in enumerate(symbols)}
    counts = collections.Counter(w.lower() for w in (words if words is not None else _CORPUS))
    # Each word as its byte symbols, the last one marked word-final, as CLIP's BPE sees it.
    pieces: dict[tuple[str, ...], int] = {}
    for word, n in counts.items():
        chars = [encode[b] for b in word.encode("utf-8")]
        chars[-1] += END_OF_WORD
        pieces[tuple(chars)] = pieces.get(tuple(chars), 0) + n

    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for piece, n in pieces.items():
            for pair in zip(piece, piece[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for piece, n in pieces.items():
            out: list[str] = []
            i = 0
            while i < len(piece):
                if i + 1 < len(piece) and (piece[i], piece[i + 1]) == best:
                    out.append(piece[i] + piece[i + 1])
                    i += 2
                else:
                    out.append(piece[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        pieces = merged

    word_final = [s + END_OF_WORD for s in symbols]
    tokens = symbols + word_final + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_clip_tokenizer(directory: str | Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``.

    The files are those SD 1.5's ``tokenizer/`` folder holds, so ``CLIPTokenizer.from_pretrained(directory)``
    loads them offline; special tokens and ``model_max_length`` (77) are SD 1.5's.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": C.SD_TOKEN_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


# SD 1.5's published component configs (runwayml/stable-diffusion-v1-5), keys as diffusers/transformers name
# them.
SD15_UNET = dict(
    sample_size=64,
    in_channels=C.SD_LATENT_CHANNELS,
    out_channels=C.SD_LATENT_CHANNELS,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' historical name: SD 1.x has 8 heads per attention
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=C.SD_LATENT_CHANNELS,
    norm_num_groups=32,
    sample_size=512,
)
SD15_TEXT = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=C.SD_TOKEN_LENGTH,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,  # the legacy value: transformers then finds the end token as the largest id, as CLIP does
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)

# The tiny model: SD 1.5's block structure (so export and shape rules are the same) with few channels.
TINY_TEXT_HIDDEN = 32
TINY_UNET = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": TINY_TEXT_HIDDEN,
    "attention_head_dim": 4,
}
TINY_VAE = {
    **SD15_VAE,
    "block_out_channels": (16, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_TEXT = {
    **SD15_TEXT,
    "hidden_size": TINY_TEXT_HIDDEN,
    "intermediate_size": 64,
    "projection_dim": TINY_TEXT_HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def make_sd_folder(directory: str | Path, size: Size = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SD 1.x pipeline folder (see the module docstring) and return its path.

    ``seed`` fixes the weights; the global torch RNG is left as it was.
    """
    from diffusers import (  # noqa: PLC0415 - heavy: only this function needs it, not the tokenizer's helpers
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: PLC0415 - heavy, as above

    if size not in SIZES:
        raise ValueError(f"size should be one of {SIZES} but is {size!r}")
    directory = Path(directory)
    vocab, merges = build_clip_bpe()
    if size == "tiny":
        unet_cfg, vae_cfg, text_cfg = TINY_UNET, TINY_VAE, {**TINY_TEXT, "vocab_size": len(vocab)}
    else:
        unet_cfg, vae_cfg, text_cfg = SD15_UNET, SD15_VAE, SD15_TEXT
    if text_cfg["vocab_size"] < len(vocab):
        raise ValueError(
            f"text encoder vocab_size {text_cfg['vocab_size']} < tokenizer vocabulary {len(vocab)}"
        )

    tokenizer_dir = write_clip_tokenizer(directory / "tokenizer", vocab, merges)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pipeline = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        unet=unet.eval(),
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    # save_pretrained re-writes tokenizer/ through transformers; put back SD 1.5's four files so the folder
    # looks like the ones users bring (some transformers versions add a tokenizer.json beside them).
    (tokenizer_dir / "tokenizer.json").unlink(missing_ok=True)
    write_clip_tokenizer(tokenizer_dir, vocab, merges)
    return directory
