"""The server-side SAM embedding cache: a click on an image already seen costs only the decoder.

Keys are the SHA-256 of the encoded image bytes (:func:`image_key`), so the same upload hits whatever its EXIF or
format; the same photo re-encoded is a different key (a miss, never a wrong answer). The cache is bounded by
entries AND bytes: it never grows past either, evicting the least recently used entries, and refuses an entry
larger than its whole byte budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from isekai import constants as C


def image_key(data: bytes) -> str:
    """Cache key of an encoded image: the hex SHA-256 of its bytes (64 characters)."""
    return hashlib.sha256(bytes(data)).hexdigest()


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

    Stored arrays are private read-only copies: a caller mutating its array after :meth:`put` cannot change the
    cache, and :meth:`get` returns the read-only array itself (no copy per hit).
    """

    def __init__(self, max_entries: int = C.EMBEDDING_CACHE_ENTRIES, max_bytes: int = C.EMBEDDING_CACHE_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"cache limits must be >= 0 but are max_entries={max_entries}, max_bytes={max_bytes}")
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
            while self._items and (len(self._items) >= self.max_entries or self._bytes + size > self.max_bytes):
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
