"""The character store, the pipeline config and the offline tokenizer (no exported graphs needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import CLIPTokenizer

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.export.make_sd import BOS_TOKEN, EOS_TOKEN, build_clip_bpe, write_clip_tokenizer

D = 8
FINGERPRINT = "f" * 64


def embeddings(seed: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, C.SD_TOKEN_LENGTH, d)).astype(np.float32)


@pytest.fixture()
def repository(tmp_path):
    chars.PipelineConfig(
        scaling_factor=0.25, scheduler_config={"_class_name": "PNDMScheduler", "steps_offset": 1},
        text_hidden_size=D, default_character="hero", text_fingerprint=FINGERPRINT,
    ).save(tmp_path)
    hero = chars.Character("hero", "a photo of sks girl", "blurry", embeddings(0))
    chars.save_character(tmp_path, hero, FINGERPRINT)
    villain = chars.Character("villain", "a dark knight", "", embeddings(1))
    chars.save_character(tmp_path, villain, FINGERPRINT)
    return tmp_path


def test_layout_on_disk(repository):
    data = repository / C.DIFFUSION_MODEL
    assert (data / chars.PIPELINE_FILE).is_file()
    for name in ("hero", "villain"):
        folder = data / chars.CHARACTERS_DIR / name
        meta = json.loads((folder / chars.CHARACTER_FILE).read_text())
        assert meta["name"] == name and meta["text_fingerprint"] == FINGERPRINT
        assert np.load(folder / chars.EMBEDDINGS_FILE).shape == (2, C.SD_TOKEN_LENGTH, D)
    assert not list(data.rglob(".*"))  # no temporary files left behind


def test_get_by_name_and_default(repository):
    store = chars.CharacterStore(repository)
    assert store.names() == ["hero", "villain"]
    hero = store.get("hero")
    assert (hero.name, hero.prompt, hero.negative_prompt) == ("hero", "a photo of sks girl", "blurry")
    np.testing.assert_array_equal(hero.embeddings, embeddings(0))
    assert hero.embeddings.dtype == np.float32
    assert store.get(None).name == store.get("").name == "hero"
    assert store.get("villain").negative_prompt == ""


def test_pipeline_config_round_trip(repository):
    config = chars.CharacterStore(repository).config
    assert config.scaling_factor == 0.25
    assert config.scheduler_config == {"_class_name": "PNDMScheduler", "steps_offset": 1}
    assert (config.text_hidden_size, config.token_length, config.default_character) == (D, 77, "hero")


def test_unknown_character_lists_the_known_ones(repository):
    with pytest.raises(ValueError) as err:
        chars.CharacterStore(repository).get("x")
    assert str(err.value) == "character 'x' is not registered; known: hero, villain"


@pytest.mark.parametrize("name", ["../hero", "a/b", ".hidden", "", "x" * 65, "naïve", "a b"])
def test_invalid_names_are_refused_before_touching_the_disk(repository, name):
    with pytest.raises(ValueError, match="character name should match"):
        chars.check_character_name(name)
    if name:  # "" means the default character in get()
        with pytest.raises(ValueError, match="character name should match"):
            chars.CharacterStore(repository).get(name)


def test_re_registered_character_is_reloaded(repository):
    store = chars.CharacterStore(repository)
    assert store.get("hero").prompt == "a photo of sks girl"
    chars.save_character(repository, chars.Character("hero", "a new prompt", "", embeddings(5)), FINGERPRINT)
    hero = store.get("hero")
    assert hero.prompt == "a new prompt"
    np.testing.assert_array_equal(hero.embeddings, embeddings(5))


def test_character_of_another_text_encoder_is_refused(repository):
    chars.save_character(repository, chars.Character("stranger", "p", "", embeddings(2)), "0" * 64)
    with pytest.raises(ValueError, match="'stranger' was registered with another text encoder"):
        chars.CharacterStore(repository).get("stranger")


def test_embeddings_of_the_wrong_width_are_refused(repository):
    chars.save_character(repository, chars.Character("wide", "p", "", embeddings(3, d=D + 1)), FINGERPRINT)
    message = r"'wide': embeddings are float32 \[2, 77, 9\], expected float32 \[2, 77, 8\]"
    with pytest.raises(ValueError, match=message):
        chars.CharacterStore(repository).get("wide")


def test_save_character_checks_the_embeddings(tmp_path):
    with pytest.raises(ValueError, match=r"embeddings should be float32 \[2, 77, D\] but are float64"):
        bad = chars.Character("a", "p", "", embeddings(0).astype(np.float64))
        chars.save_character(tmp_path, bad, FINGERPRINT)


def test_missing_pipeline_config_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="isekai export sd --repository"):
        chars.CharacterStore(tmp_path).get("hero")
    assert chars.CharacterStore(tmp_path).names() == []


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    vocab, merges = build_clip_bpe()
    return write_clip_tokenizer(tmp_path_factory.mktemp("tok"), vocab, merges)


def test_clip_bpe_vocabulary_is_well_formed():
    vocab, merges = build_clip_bpe()
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab[BOS_TOKEN] == len(vocab) - 2 and vocab[EOS_TOKEN] == len(vocab) - 1  # last, as in CLIP
    assert all("".join(pair) in vocab for pair in merges)
    assert all(a in vocab and b in vocab for a, b in merges)
    assert build_clip_bpe() == (vocab, merges)  # deterministic


@pytest.mark.parametrize(
    "prompt",
    ["a photo of sks girl, anime style", "", "Ünïcödé 日本 42!!", "masterpiece " * 100, "  lots\tof   space  "],
)
def test_tokenizer_matches_the_sd_pipelines_tokenization(tokenizer_dir, prompt):
    ids = chars.Tokenizer(tokenizer_dir)(prompt)
    assert ids.shape == (1, C.SD_TOKEN_LENGTH) and ids.dtype == np.dtype(C.TEXT_IDS_DTYPE)
    # What diffusers' StableDiffusionPipeline.encode_prompt does with the folder's tokenizer.
    reference = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    want = reference(prompt, padding="max_length", max_length=reference.model_max_length, truncation=True,
                     return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, want)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert ids[0, 0] == vocab[BOS_TOKEN]
    assert vocab[EOS_TOKEN] in ids[0]  # the end token survives truncation
    assert ids.max() < len(vocab)


def test_known_words_are_single_tokens(tokenizer_dir):
    ids = chars.Tokenizer(tokenizer_dir)("a photo of sks girl")
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    words = [vocab[w + "</w>"] for w in ("a", "photo", "of", "sks", "girl")]
    assert ids[0, 1:6].tolist() == words and ids[0, 6] == vocab[EOS_TOKEN]


def test_tokenizer_from_repository_and_missing_files(repository, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        chars.Tokenizer.from_repository(repository)
    target = repository / C.DIFFUSION_MODEL / chars.TOKENIZER_DIR
    target.mkdir(parents=True)
    for name in chars.TOKENIZER_FILES:
        (target / name).write_bytes((tokenizer_dir / name).read_bytes())
    assert chars.Tokenizer.from_repository(repository)("a girl").shape == (1, 77)
