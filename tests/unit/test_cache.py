"""The embedding cache: LRU order, both bounds, oversized entries, stats, isolation, threads."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from isekai import constants as C
from isekai.ensemble.cache import EmbeddingCache, image_key


def _array(nbytes: int, fill: float = 1.0) -> np.ndarray:
    return np.full(nbytes // 4, fill, np.float32)


def test_image_key_is_the_sha256_of_the_bytes():
    assert image_key(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert image_key(bytearray(b"abc")) == image_key(b"abc") != image_key(b"abd")
    assert len(image_key(b"")) == 64


def test_defaults_come_from_constants():
    cache = EmbeddingCache()
    assert (cache.max_entries, cache.max_bytes) == (C.EMBEDDING_CACHE_ENTRIES, C.EMBEDDING_CACHE_BYTES)


def test_get_put_and_lru_eviction_by_entries():
    cache = EmbeddingCache(max_entries=2, max_bytes=10_000)
    cache.put("a", _array(40, 1))
    cache.put("b", _array(40, 2))
    assert cache.get("a")[0] == 1  # a is now the most recent
    cache.put("c", _array(40, 3))  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.entries, s.bytes) == (1, 1, 1, 2, 80)


def test_eviction_by_bytes_and_replacement():
    cache = EmbeddingCache(max_entries=100, max_bytes=100)
    for key in "abc":
        cache.put(key, _array(40))
    assert len(cache) == 2 and "a" not in cache and cache.stats().bytes == 80
    cache.put("b", _array(20))  # replacing an entry updates the byte count
    assert cache.stats().bytes == 60 and len(cache) == 2
    cache.put("d", _array(80))  # needs 80 of 100: c (least recent, 40) goes, b (20) still fits
    assert [k for k in "abcd" if k in cache] == ["b", "d"] and cache.stats().bytes == 100
    cache.put("e", _array(100))  # the whole budget: everything else goes
    assert [k for k in "abcde" if k in cache] == ["e"] and cache.stats().evictions == 4


def test_entry_bigger_than_the_budget_is_not_stored():
    cache = EmbeddingCache(max_entries=4, max_bytes=100)
    cache.put("small", _array(40))
    assert cache.put("huge", _array(104)) is False
    assert "huge" not in cache and "small" in cache and cache.stats().bytes == 40
    assert EmbeddingCache(max_entries=0).put("x", _array(4)) is False


def test_stored_arrays_are_private_and_read_only():
    cache = EmbeddingCache()
    value = _array(16, 1)
    cache.put("k", value)
    value[:] = 9  # the caller's array is not the cache's
    got = cache.get("k")
    assert (got == 1).all()
    with pytest.raises(ValueError):
        got[0] = 5


def test_clear_keeps_counters():
    cache = EmbeddingCache()
    cache.put("k", _array(8))
    cache.get("k")
    cache.clear()
    s = cache.stats()
    assert (s.entries, s.bytes, s.hits) == (0, 0, 1)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="cache limits"):
        EmbeddingCache(max_entries=-1)


def test_concurrent_use_never_breaks_the_bounds():
    cache = EmbeddingCache(max_entries=8, max_bytes=8 * 64)
    errors = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(300):
                key = str(rng.integers(0, 20))
                if cache.get(key) is None:
                    cache.put(key, _array(int(rng.integers(1, 25)) * 4))
                s = cache.stats()
                assert s.entries <= 8 and s.bytes <= 8 * 64
        except Exception as exc:  # noqa: BLE001 - reported below  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = cache.stats()
    assert s.hits + s.misses == 4 * 300
    assert s.bytes == sum(cache.get(k).nbytes for k in map(str, range(20)) if k in cache)
