"""The embedding cache's keys name the encoder graph (graph_identity) and the lookup order preprocess follows
(EmbeddingSource): cache, else the encoder, then store; never store what another graph computed."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from isekai.ensemble.cache import (
    EmbeddingCache,
    EmbeddingSource,
    GraphMismatch,
    embedding_key,
    graph_identity,
)


def _graph(folder, data: bytes = b"graph", mtime_ns: int = 1_700_000_000_000_000_000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(data)
    os.utime(folder / "model.onnx", ns=(mtime_ns, mtime_ns))


def test_graph_identity_changes_with_a_new_export_and_ignores_the_adapter(tmp_path):
    version = tmp_path / "sam_encoder" / "1"
    assert graph_identity(version) == ""  # no folder
    _graph(version)
    first = graph_identity(version)
    assert len(first) == 16
    (version / "model.py").write_text("# the adapter")
    (version / "__pycache__").mkdir()
    assert graph_identity(version) == first
    _graph(version, mtime_ns=1_700_000_000_000_000_001)  # re-exported: same bytes, a new file
    assert graph_identity(version) != first
    _graph(version, mtime_ns=1_700_000_000_000_000_000)
    assert graph_identity(version) == first
    (version / "model.onnx.data").write_bytes(b"weights")  # external data is part of the graph
    assert graph_identity(version) != first


def test_a_copy_that_keeps_the_times_keeps_the_identity(tmp_path):
    _graph(tmp_path / "a" / "1")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copy2: times kept, as tests copy repositories
    assert graph_identity(tmp_path / "b" / "1") == graph_identity(tmp_path / "a" / "1")


class FakeServer:
    """The cache model and sam_encoder as preprocess sees them: a loaded graph and the graph on disk."""

    def __init__(self) -> None:
        self.cache = EmbeddingCache(max_entries=4, max_bytes=1 << 20)
        self.disk = "g1"  # identity of the graph files
        self.loaded = "g1"  # identity of the graph the encoder model serves
        self.encodes: list[str | None] = []
        self.cache_broken = False

    def lookup(self, key: str):
        if self.cache_broken:
            raise RuntimeError("embedding_cache: Stub process is not healthy")
        return self.cache.get(key)

    def store(self, key: str, value) -> None:
        if self.cache_broken:
            raise RuntimeError("embedding_cache: Stub process is not healthy")
        self.cache.put(key, value)

    def encode(self, pixels: np.ndarray, graph: str | None) -> np.ndarray:
        self.encodes.append(graph)
        if graph is not None and graph != self.loaded:
            raise GraphMismatch(f"sam_encoder serves {self.loaded}, not {graph}")
        return np.full((1, 2), float(self.loaded[1:]) + pixels.sum(), np.float32)

    def source(self) -> EmbeddingSource:
        return EmbeddingSource(lambda: self.disk, self.lookup, self.store, self.encode)


def pixels() -> np.ndarray:
    return np.zeros(3, np.float32)


def test_a_miss_encodes_with_the_expected_graph_and_stores_then_hits():
    server = FakeServer()
    source = server.source()
    made = []
    first = source.get("img", lambda: made.append(1) or pixels())
    assert server.encodes == ["g1"] and made == [1]
    second = source.get("img", lambda: made.append(1) or pixels())
    assert server.encodes == ["g1"] and made == [1], "a hit neither encodes nor builds the encoder input"
    assert np.array_equal(first, second)
    assert embedding_key("img", "g1") in server.cache


def test_after_a_reexport_and_reload_the_old_embedding_is_never_served():
    server = FakeServer()
    source = server.source()
    old = source.get("img", pixels)
    server.disk = "g2"  # re-exported: the old graph still serves until the reload
    between = source.get("img", pixels)
    assert np.array_equal(between, old), "before the reload the loaded encoder (and decoder) are the old ones"
    assert server.encodes == ["g1", "g2", None], "asked for g2, refused, then encoded by what is loaded"
    assert embedding_key("img", "g2") not in server.cache, "an embedding of g1 was stored under g2's key"
    server.loaded = "g2"  # reloaded
    fresh = source.get("img", pixels)
    assert not np.array_equal(fresh, old)
    assert server.encodes[-1] == "g2" and embedding_key("img", "g2") in server.cache
    assert np.array_equal(source.get("img", pixels), fresh)


def test_a_broken_cache_costs_an_encode_not_the_request():
    server = FakeServer()
    server.cache_broken = True
    source = server.source()
    assert source.get("img", pixels).shape == (1, 2)
    assert source.get("img", pixels).shape == (1, 2)
    assert server.encodes == ["g1", "g1"]


def test_without_a_graph_on_disk_nothing_is_stored():
    server = FakeServer()
    server.disk = ""
    source = server.source()
    source.get("img", pixels)
    source.get("img", pixels)
    assert server.encodes == [None, None] and len(server.cache) == 0


def test_other_encoder_errors_fail_the_request():
    server = FakeServer()

    def broken(pixels, graph):
        raise RuntimeError("sam_encoder: running the graph failed")

    with pytest.raises(RuntimeError, match="running the graph failed"):
        EmbeddingSource(lambda: "g1", server.lookup, server.store, broken).get("img", pixels)
