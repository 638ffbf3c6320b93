"""The server-side SAM embedding cache: a click on an image already seen costs only the decoder.

Keys (:func:`embedding_key`) are the SHA-256 of the encoded image bytes (:func:`image_key`), so the same
upload hits whatever its EXIF or format (the same photo re-encoded is a different key: a miss, never a wrong
answer), joined to the identity of the encoder graph that computed the embedding (:func:`graph_identity`), so
SAM re-exported and reloaded never meets an embedding of the old encoder. The cache is bounded by entries AND
bytes: it never grows past either, evicting the least recently used entries, and refuses an entry larger than
its whole byte budget.

:class:`EmbeddingSource` is the lookup order preprocess follows (cache, else the encoder, then store), with
the cache and the encoder passed in as callables: BLS calls in the server, fakes in the unit tests.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isekai import constants as C

log = logging.getLogger("isekai")


def image_key(data: bytes) -> str:
    """Cache key of an encoded image: the hex SHA-256 of its bytes (64 characters)."""
    return hashlib.sha256(bytes(data)).hexdigest()


def graph_identity(version_folder: str | Path) -> str:
    """Identity of the exported graph in a model's version folder (``<repository>/<model>/1``): the hex
    SHA-256 (first 16 characters) of the name, size and modification time (ns) of each graph file in it
    (``model.onnx``, its external data, ``model.plan``; not ``model.py``).

    An export writes new files, so its identity changes; a copy that keeps the files' times (``shutil.copy2``)
    keeps it. A stat per file and no read: cheap enough to check on every request. "" when the folder holds no
    graph.
    """
    folder = Path(version_folder)
    digest = hashlib.sha256()
    found = False
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return ""
    for path in entries:
        if not path.name.startswith("model.") or path.suffix == ".py":
            continue
        try:
            stat = path.stat()
        except OSError:  # replaced meanwhile: the next request sees the new file
            continue
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        found = True
    return digest.hexdigest()[:16] if found else ""


def embedding_key(image: str, encoder: str) -> str:
    """Cache key of an embedding: the image's :func:`image_key` and the encoder's :func:`graph_identity`."""
    return f"{image}@{encoder}"


class GraphMismatch(RuntimeError):
    """The encoder model serves another graph than the one the key names (re-exported, not yet reloaded)."""


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot of the cache's counters."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int


class EmbeddingCache:
    """Thread-safe LRU of numpy arrays, bounded by entry count and total ``nbytes``.

    Stored arrays are private read-only copies: a caller mutating its array after :meth:`put` cannot change
    the cache, and :meth:`get` returns the read-only array itself (no copy per hit).
    """

    def __init__(self, max_entries: int = C.EMBEDDING_CACHE_ENTRIES,
                 max_bytes: int = C.EMBEDDING_CACHE_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"cache limits must be >= 0 but are max_entries={max_entries}, "
                             f"max_bytes={max_bytes}")
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        """The array stored under ``key`` (now most recently used), or None. Counts a hit or a miss."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: str, value: np.ndarray) -> bool:
        """Store a copy of ``value`` under ``key``, evicting least recently used entries to fit.

        Returns False (and stores nothing, leaving an older entry of that key removed) when the array alone is
        larger than ``max_bytes`` or the cache holds no entries at all.
        """
        stored = np.array(value, copy=True)
        stored.flags.writeable = False
        size = int(stored.nbytes)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= int(old.nbytes)
            if size > self.max_bytes or self.max_entries == 0:
                return False
            while self._items and (
                len(self._items) >= self.max_entries or self._bytes + size > self.max_bytes
            ):
                _, evicted = self._items.popitem(last=False)
                self._bytes -= int(evicted.nbytes)
                self._evictions += 1
            self._items[key] = stored
            self._bytes += size
            return True

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._items), self._bytes,
                              self.max_entries, self.max_bytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency or counters."""
        with self._lock:
            return key in self._items


class EmbeddingSource:
    """Image embeddings from the cache, else from the encoder (then stored), keyed by the encoder's identity.

    Args:
        identity: the encoder graph's current identity on disk (:func:`graph_identity`), read per request.
        lookup: ``key -> embedding or None``; store: ``(key, embedding) -> None``. A cache that fails is
            logged and treated as a miss (or as not storing): it costs an encode, never the request.
        encode: ``(encoder_input, identity or None) -> embedding``: f32 [1, 3, 1024, 1024] ->
            f32 [1, 256, 64, 64]. Given an identity, it raises :class:`GraphMismatch` when the encoder it
            calls serves another graph; given None, it runs whatever graph is loaded.
    """

    def __init__(self, identity: Callable[[], str], lookup: Callable[[str], np.ndarray | None],
                 store: Callable[[str, np.ndarray], None],
                 encode: Callable[[np.ndarray, str | None], np.ndarray],
                 ) -> None:
        self.identity, self.lookup, self.store, self.encode = identity, lookup, store, encode

    def get(self, image: str, encoder_input: Callable[[], np.ndarray]) -> np.ndarray:
        """The embedding of the image whose :func:`image_key` is ``image``; ``encoder_input()`` makes the
        encoder's input, only on a miss. An embedding computed by a graph other than the one on disk is
        returned but never stored: between a re-export and the reload, the loaded (old) encoder and decoder
        still agree."""
        identity = self.identity()
        key = embedding_key(image, identity)
        try:
            cached = self.lookup(key)
        except Exception as err:  # noqa: BLE001 - a cache failing costs an encode, not the request
            log.warning("embedding cache lookup failed (encoding instead): %s", err)
            cached = None
        if cached is not None:
            return cached
        pixels = encoder_input()
        try:
            embedding = self.encode(pixels, identity or None)
        except GraphMismatch as err:
            log.warning("%s; this embedding is not cached", err)
            return self.encode(pixels, None)
        # without an identity (no graph file to stat, e.g. a remote repository) nothing is keyed safely
        if identity:
            try:
                self.store(key, embedding)
            except Exception as err:  # noqa: BLE001 - as above
                log.warning("embedding cache store failed: %s", err)
        return embedding
