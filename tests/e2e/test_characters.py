"""Characters on a running server (the characters issue, end to end over gRPC on the small checkpoints).

One tritonserver on a private copy of the demo repository, whose unet keeps at most one full fine-tune's graph
loaded (so the least-recently-used unloading is seen). Characters registered by the module:

- ``hero``: a diffusers-layout LoRA on the attention layers and the text encoder;
- ``hero-fused``: the same LoRA fused into the base by diffusers (``load_lora_weights`` + ``fuse_lora``) and
  saved as a full fine-tune folder: a LoRA character must draw what its fused fine-tune draws;
- ``tuned``: another full fine-tune (other UNet weights);
- the demo's ``default`` (prompt) and ``lora-demo`` (a kohya LoRA on every layer).
"""

from __future__ import annotations

import io
import re
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from tritonclient.utils import InferenceServerException

from isekai import constants as C
from isekai.cli import main
from isekai.client.client import IsekaiClient
from isekai.client.stats import prometheus_values
from isekai.ensemble import characters as chars
from isekai.export import characters
from isekai.export.make_lora import attention_only, random_factors, write_lora
from isekai.serving.stubs import server_stubs
from tests.conftest import ASTRONAUT_CLICK, CACHE, start_server
from tests.e2e.serve import copy_repository
from tests.export.test_characters import fine_tune

pytestmark = pytest.mark.e2e

OPTIONS = dict(steps=4, strength=0.75, seed=3)  # 3 UNet calls: a swap of a few seconds on the tiny models


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def served(demo_repository, tmp_path_factory):
    root = tmp_path_factory.mktemp("characters")
    repository = copy_repository(demo_repository, root / "repository")
    config = repository / C.UNET_MODEL / "config.pbtxt"
    text, n = re.subn(r'(key: "character_graph_bytes" value: \{ string_value: )"\d+"', r'\1"1"',
                      config.read_text())
    assert n == 1, "unet/config.pbtxt has no character_graph_bytes parameter"
    config.write_text(text)

    base_folder = CACHE / "checkpoints" / "sd-tiny"
    base = characters.Base.load(repository)
    unet = random_factors(attention_only(base.slots[C.UNET_MODEL]), rank=4, seed=11)
    text_encoder = random_factors(base.slots[C.TEXT_ENCODER_MODEL], rank=4, seed=12)
    lora = write_lora(root / "hero" / "pytorch_lora_weights.safetensors", unet, text_encoder,
                      layout="diffusers", alpha=8.0, text_model_prefix=False)
    characters.add_lora_character(repository, "hero", lora, "a photo of sks girl", "blurry")
    characters.add_full_character(repository, "hero-fused", fused(base_folder, lora, root / "hero-fused"),
                                  "a photo of sks girl", "blurry")
    characters.add_full_character(repository, "tuned", fine_tune(base_folder, root), "a photo of sks girl")

    server = start_server(repository, root / "server.log")
    yield server, repository
    server.stop(grace_s=30)


def fused(base_folder, lora, target):
    """The base with the LoRA fused in by diffusers, saved as a full fine-tune (what a merge script
    writes)."""
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 - diffusers is heavy, only when asked

    pipe = StableDiffusionPipeline.from_pretrained(str(base_folder), local_files_only=True,
                                                   safety_checker=None)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(target), safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(base_folder / "tokenizer" / f, target / "tokenizer" / f)
    return target


@pytest.fixture(scope="module")
def client(served):
    c = IsekaiClient(served[0].grpc_url)
    yield c
    c.close()


def swap(client, photo, **options):
    return client.swap(photo, [ASTRONAUT_CLICK], **{**OPTIONS, **options})


def test_the_server_lists_its_characters(client):
    listed = {c.name: c for c in client.characters()}
    assert {"default", "lora-demo", "hero", "hero-fused", "tuned"} <= set(listed)
    assert listed["default"].default and not listed["hero"].default
    assert ((listed["hero"].kind, listed["hero-fused"].kind, listed["default"].kind)
            == ("lora", "full", "prompt"))
    assert listed["hero"].prompt == "a photo of sks girl" and all(c.drawable for c in listed.values())
    assert [c.name for c in client.characters("hero")] == ["hero"]
    with pytest.raises(InferenceServerException, match="'nobody' is not registered"):
        client.characters("nobody")


def test_lora_character_draws_what_its_fused_fine_tune_draws(client, astronaut_png):
    lora = decoded(swap(client, astronaut_png, character="hero").result)
    full = decoded(swap(client, astronaut_png, character="hero-fused").result)
    base = decoded(swap(client, astronaut_png, character="default").result)
    # The same numbers up to float32 summation order (the adapter adds B(Ax) where the fine-tune has W + BA):
    # the UNet outputs agree to ~1e-6, the pixels to a level (compose cuts both by the person's own mask; with
    # silhouette "sam", SAM on the drawn crop flips at its edge: 0.005 % of the pixels differed by more than 2
    # levels).
    far = (np.abs(lora - full).max(axis=-1) > 2).mean()
    assert far < 1e-3, f"{far:.4%} of the pixels differ by more than 2 levels"
    assert np.abs(lora - base).mean() > 100 * np.abs(lora - full).mean()


def test_requests_without_character_draw_the_default(client, served, astronaut_png):
    _, repository = served
    assert swap(client, astronaut_png).result == swap(client, astronaut_png, character="default").result
    characters.set_default(repository, "hero")
    try:
        assert swap(client, astronaut_png).result == swap(client, astronaut_png, character="hero").result
        assert [c.name for c in client.characters() if c.default] == ["hero"]
    finally:
        characters.set_default(repository, C.DEFAULT_CHARACTER)


def test_concurrent_requests_of_different_characters_never_mix(client, astronaut_png):
    jobs = [dict(character="hero", seed=1), dict(character="lora-demo", seed=1),
            dict(character="hero", seed=2), dict(character="tuned", seed=1)]
    alone = [swap(client, astronaut_png, **job).result for job in jobs]
    together: list[bytes | None] = [None] * len(jobs)

    def run(i: int) -> None:
        together[i] = swap(client, astronaut_png, **jobs[i]).result

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job, a, b in zip(jobs, alone, together, strict=True):
        assert a == b, f"{job}: the bytes changed when other characters ran beside it"


def weights_metrics(server) -> dict[str, float]:
    prefix = "isekai_character_weights_"
    return {k[len(prefix):]: v for k, v in prometheus_values(server.metrics_url, prefix).items()}


def test_full_fine_tunes_load_on_first_use_and_unload_least_recently_used(client, served, astronaut_png):
    server, repository = served
    graph = sum(
        f.stat().st_size for f in (chars.characters_dir(repository) / "tuned" / C.UNET_MODEL).iterdir()
    )
    swap(client, astronaut_png, character="hero-fused")  # loaded (or already held)
    before = weights_metrics(server)
    swap(client, astronaut_png, character="tuned")  # the budget holds one graph: hero-fused goes
    swap(client, astronaut_png, character="hero-fused")  # ... and comes back
    after = weights_metrics(server)
    assert after["loads_total"] - before["loads_total"] == 2
    assert after["evictions_total"] - before["evictions_total"] == 2
    assert after["graph_bytes"] == pytest.approx(graph, rel=0.05)  # one UNet graph held, not two


def unet_stub(server) -> int:
    stubs = [s.pid for s in server_stubs(server.process.pid) if s.model == C.UNET_MODEL and not s.zombie]
    assert len(stubs) == 1, stubs
    return stubs[0]


def test_characters_added_and_removed_while_serving_without_reloading_unet(client, served, astronaut_png,
                                                                           tmp_path):
    server, repository = served
    stub = unet_stub(server)
    base = characters.Base.load(repository)
    lora = write_lora(tmp_path / "temp.safetensors", random_factors(base.slots[C.UNET_MODEL], 4, seed=21),
                      layout="kohya")
    characters.add_lora_character(repository, "temp", lora, "a photo of sks boy")
    assert "temp" in {c.name for c in client.characters()}
    slow = dict(character="temp", steps=40, strength=0.5)  # 20 UNet calls: still running when temp goes
    want = swap(client, astronaut_png, **slow).result
    got: dict[str, object] = {}

    def run() -> None:
        try:
            got["result"] = swap(client, astronaut_png, **slow).result
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            got["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(2.0)  # past preprocess and well into the UNet loop
    characters.remove_character(repository, "temp")
    thread.join()
    assert got.get("result") == want, got.get("error")  # the swap in flight was not disturbed
    with pytest.raises(InferenceServerException, match="'temp' is not registered") as err:
        swap(client, astronaut_png, character="temp")
    assert "INVALID_ARG" in str(err.value.status())
    assert "temp" not in {c.name for c in client.characters()}
    assert unet_stub(server) == stub  # the same unet process served all of it: no reload


def test_a_character_of_another_base_is_refused_by_name(client, served, astronaut_png):
    _, repository = served
    embeddings = np.zeros((2, C.SD_TOKEN_LENGTH, chars.PipelineConfig.load(repository).text_hidden_size),
                          np.float32)
    chars.write_character(repository, chars.Character("stranger", "p", "", embeddings), "0" * 64)
    with pytest.raises(
        InferenceServerException, match="'stranger' was registered on another base model"
    ) as err:
        swap(client, astronaut_png, character="stranger")
    assert "INVALID_ARG" in str(err.value.status())
    assert "another base model" in {c.name: c for c in client.characters()}["stranger"].problem


def test_a_character_trained_from_photos_serves(client, served, astronaut_png, tmp_path):
    _, repository = served
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (y, x) in enumerate([(0, 0), (64, 96), (128, 32)]):
        Image.fromarray(data.astronaut()[y : y + 256, x : x + 256]).save(photos / f"{i}.png")
    torch.set_num_threads(1)
    code = main(["character", "train", "trained", "--images", str(photos), "--base",
                 str(CACHE / "checkpoints" / "sd-tiny"), "--prompt", "a photo of sks girl", "--steps", "2",
                 "--resolution", "64", "--output", str(tmp_path / "run"), "--repository", str(repository)])
    assert code == 0
    listed = {c.name: c for c in client.characters()}
    assert listed["trained"].kind == "lora" and "diffusers" in listed["trained"].source
    trained = decoded(swap(client, astronaut_png, character="trained").result)
    assert trained.shape == decoded(astronaut_png).shape
