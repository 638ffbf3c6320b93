"""The character store, the pipeline config and the offline tokenizer (no exported graphs needed)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from transformers import CLIPTokenizer

from isekai import constants as C
from isekai.ensemble import characters as chars
from isekai.export.make_sd import BOS_TOKEN, EOS_TOKEN, build_clip_bpe, write_clip_tokenizer

D = 8
BASE = "b" * 64


def embeddings(seed: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, C.SD_TOKEN_LENGTH, d)).astype(np.float32)


def config(default: str | None = "hero", base: str = BASE) -> chars.PipelineConfig:
    return chars.PipelineConfig(
        scaling_factor=0.25, scheduler_config={"_class_name": "PNDMScheduler", "steps_offset": 1},
        text_hidden_size=D, default_character=default, base_fingerprint=base,
    )


@pytest.fixture()
def repository(tmp_path):
    config().save(tmp_path)
    chars.write_character(tmp_path, chars.Character("hero", "a photo of sks girl", "blurry", embeddings(0)),
                          BASE)
    chars.write_character(tmp_path, chars.Character("villain", "a dark knight", "", embeddings(1)), BASE)
    return tmp_path


def tree(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what "left exactly as it was" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_on_disk(repository):
    data = repository / C.DIFFUSION_MODEL
    assert (data / chars.PIPELINE_FILE).is_file()
    for name in ("hero", "villain"):
        folder = data / chars.CHARACTERS_DIR / name
        meta = json.loads((folder / chars.CHARACTER_FILE).read_text())
        assert meta["name"] == name and meta["base_fingerprint"] == BASE and meta["kind"] == "prompt"
        assert len(meta["revision"]) == 12 and meta["weights"] == {}
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
    assert hero.key == f"hero@{hero.revision}"


def test_pipeline_config_round_trip(repository):
    loaded = chars.CharacterStore(repository).config
    assert loaded == config()


def test_pipeline_config_of_an_older_isekai_says_to_export_again(tmp_path):
    path = chars.data_dir(tmp_path) / chars.PIPELINE_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match="format 1 is not 2 .* `isekai export sd"):
        chars.PipelineConfig.load(tmp_path)


def test_unknown_character_lists_the_known_ones(repository):
    with pytest.raises(ValueError) as err:
        chars.CharacterStore(repository).get("x")
    assert str(err.value) == "character 'x' is not registered; known: hero, villain"


def test_no_default_character_says_how_to_pick_one(tmp_path):
    config(default=None).save(tmp_path)
    with pytest.raises(ValueError, match="no default character .* --default"):
        chars.CharacterStore(tmp_path).get(None)


@pytest.mark.parametrize("name", ["../hero", "a/b", ".hidden", "", "x" * 65, "naïve", "a b"])
def test_invalid_names_are_refused_before_touching_the_disk(repository, name):
    with pytest.raises(ValueError, match="character name should match"):
        chars.check_character_name(name)
    if name:  # "" means the default character in get()
        with pytest.raises(ValueError, match="character name should match"):
            chars.CharacterStore(repository).get(name)


def test_re_registered_character_is_reloaded_with_a_new_revision(repository):
    store = chars.CharacterStore(repository)
    before = store.get("hero")
    chars.write_character(repository, chars.Character("hero", "a new prompt", "", embeddings(5)), BASE)
    hero = store.get("hero")
    assert hero.prompt == "a new prompt" and hero.revision != before.revision
    np.testing.assert_array_equal(hero.embeddings, embeddings(5))


def test_character_of_another_base_is_refused_and_listed_with_the_reason(repository):
    chars.write_character(repository, chars.Character("stranger", "p", "", embeddings(2)), "0" * 64)
    with pytest.raises(ValueError,
                       match="'stranger' was registered on another base model .* register it again"):
        chars.CharacterStore(repository).get("stranger")
    infos = {i.name: i for i in chars.CharacterStore(repository).infos()}
    assert "another base model" in infos["stranger"].problem
    assert infos["hero"].problem is None and infos["hero"].default and not infos["villain"].default
    assert infos["hero"].bytes > 2 * C.SD_TOKEN_LENGTH * D * 4
    assert (infos["hero"].steps, infos["hero"].guidance) == (C.DEFAULT_STEPS, C.DEFAULT_GUIDANCE)


def test_the_list_gives_the_exported_schedulers_defaults(repository):
    """After an LCM-LoRA export a swap that leaves steps and guidance out gets 4 and 1: the list says so."""
    dataclasses.replace(config(), scheduler=C.LCM_SCHEDULER).save(repository)
    infos = chars.CharacterStore(repository).infos()
    assert {(i.steps, i.guidance) for i in infos} == {(C.LCM_STEPS, C.LCM_GUIDANCE)}
    (chars.data_dir(repository) / chars.PIPELINE_FILE).unlink()
    assert {(i.steps, i.guidance) for i in chars.CharacterStore(repository).infos()} == {(None, None)}


def test_a_re_exported_base_turns_cached_characters_away(repository):
    store = chars.CharacterStore(repository)
    store.get("hero")  # cached
    config(base="c" * 64).save(repository)
    with pytest.raises(ValueError, match="another base model"):
        store.get("hero")


def test_embeddings_of_the_wrong_width_are_refused(repository):
    chars.write_character(repository, chars.Character("wide", "p", "", embeddings(3, d=D + 1)), BASE)
    message = r"'wide': embeddings are float32 \[2, 77, 9\], expected float32 \[2, 77, 8\]"
    with pytest.raises(ValueError, match=message):
        chars.CharacterStore(repository).get("wide")


def test_write_character_checks_the_embeddings(tmp_path):
    with pytest.raises(ValueError, match=r"embeddings should be float32 \[2, 77, D\] but are float64"):
        chars.write_character(tmp_path, chars.Character("a", "p", "", embeddings(0).astype(np.float64)), BASE)


def test_failed_writes_leave_the_repository_as_it_was(repository, tmp_path):
    before = tree(repository)
    adapter = chars.Character("lora", "p", "", embeddings(0), kind="lora", weights={"unet": "adapter"})
    with pytest.raises(ValueError, match="its unet adapter file is missing"):
        chars.write_character(repository, adapter, BASE)  # no file given for the declared weights
    with pytest.raises(ValueError, match="'hero' is already registered"):
        chars.write_character(repository, chars.Character("hero", "p", "", embeddings(0)), BASE,
                              replace=False)
    with pytest.raises(ValueError, match="weights should map"):
        bad = chars.Character("x", "p", "", embeddings(0), weights={"vae_decoder": "graph"})
        chars.write_character(repository, bad, BASE)
    assert tree(repository) == before


def test_weights_of_a_character_follow_its_revision(repository, tmp_path):
    source = tmp_path / "unet.onnx_adapter"
    source.write_bytes(b"adapter")
    lora = chars.Character("lora", "p", "", embeddings(0), kind="lora", weights={"unet": "adapter"})
    folder = chars.write_character(repository, lora, BASE, {"unet.onnx_adapter": source})
    store = chars.CharacterStore(repository)
    key = store.get("lora").key
    assert store.weights_of(key, C.UNET_MODEL) == ("adapter", folder / "unet.onnx_adapter")
    assert store.weights_of(key, C.TEXT_ENCODER_MODEL) is None  # no text-encoder weights of its own
    assert store.weights_of(store.get("hero").key, C.UNET_MODEL) is None
    chars.write_character(repository, chars.Character("lora", "p", "", embeddings(0)), BASE)
    with pytest.raises(chars.CharacterChanged, match="registered again while this request ran"):
        store.weights_of(key, C.UNET_MODEL)
    chars.remove_character_folder(repository, "lora")
    with pytest.raises(chars.CharacterChanged, match="not registered"):
        store.weights_of(key, C.UNET_MODEL)
    with pytest.raises(ValueError, match="NAME@REVISION"):
        store.weights_of("lora", C.UNET_MODEL)
    assert store.names() == ["hero", "villain"] and not list(chars.characters_dir(repository).glob(".*"))


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
    ["a photo of sks girl, anime style", "", "Ünïcödé 日本 42!!", "masterpiece " * 100,
     "  lots\tof   space  "],
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


def test_the_stores_tokenizer_is_read_again_when_its_files_change(repository, tokenizer_dir):
    target = repository / C.DIFFUSION_MODEL / chars.TOKENIZER_DIR
    target.mkdir(parents=True)
    for name in chars.TOKENIZER_FILES:
        (target / name).write_bytes((tokenizer_dir / name).read_bytes())
    store = chars.CharacterStore(repository)
    first = store.tokenizer()
    assert store.tokenizer() is first  # unchanged files: the same object
    vocab = json.loads((target / "vocab.json").read_text())
    vocab["zzzz</w>"] = len(vocab)
    chars.atomic_write(target / "vocab.json", json.dumps(vocab).encode())
    assert store.tokenizer() is not first
