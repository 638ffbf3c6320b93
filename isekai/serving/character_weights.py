"""The weights characters bring for one ONNX model, loaded on first use beside the one base session.

A request to ``unet`` or ``text_encoder`` names its character as ``NAME@REVISION`` (the ``character`` input;
empty for the base). :class:`CharacterWeights` turns that into what onnxruntime runs:

- a character without weights of its own for this model: the base session as it is;
- a LoRA character: the base session with the character's ``.onnx_adapter`` active for the run
  (``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter``), so N characters cost N adapters, not N
  models;
- a full fine-tune: its own session on its own ``model.onnx``.

Both kinds are loaded on first use and kept in least-recently-used order, bounded in bytes (adapters and own
graphs each have their budget): a server with many characters holds the ones in use. Nothing here needs
Triton; the characters' files are read through :class:`isekai.ensemble.characters.CharacterStore`, so a
character added or removed on disk is seen without a reload, and a request never mixes two revisions of one
character.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isekai.ensemble.characters import CharacterStore, parse_key, plan_path

log = logging.getLogger("isekai")

# Keys remembered at most (characters without weights of their own cost nothing but an entry).
MAX_ENTRIES = 1024


@dataclass
class Loaded:
    """A character's weights ready to run: the session and, for an adapter, the run options activating it."""

    session: Any  # onnxruntime.InferenceSession
    run_options: Any | None  # onnxruntime.RunOptions with the adapter active, or None
    nbytes: int
    form: str  # "base", "adapter" or "graph"
    # The onnxruntime.LoraAdapter: RunOptions keeps only a pointer to it, so it must live as long as they do.
    adapter: Any | None = None


@dataclass(frozen=True)
class WeightsStats:
    loads: int
    evictions: int
    adapter_bytes: int
    graph_bytes: int


def _file_bytes(path: Path) -> int:
    """Bytes of a model file and its external data (``model.onnx.data`` and the like beside it)."""
    if path.suffix == ".onnx":
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    return path.stat().st_size


class CharacterWeights:
    """``key -> (session, run_options)`` for one model, with LRU budgets for adapters and own graphs
    (bytes)."""

    def __init__(
        self,
        store: CharacterStore,
        model: str,
        base_session: Any,
        open_session: Callable[[Path], Any],
        adapter_budget: int,
        graph_budget: int,
        plans: bool = False,
    ) -> None:
        """``open_session(path)`` opens a graph the way the base was opened; with ``plans`` (the tensorrt
        runtime) every character with weights of its own runs its TensorRT plan (``<character>/<model>.plan``,
        an adapter fused in or its own graph), opened by ``open_session`` too and counted against the graph
        budget."""
        self.store = store
        self.model = model
        self.base = Loaded(base_session, None, 0, "base")
        self.open_session = open_session
        self.plans = plans
        self.budgets = {"adapter": int(adapter_budget), "graph": int(graph_budget)}
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loads = 0
        self._evictions = 0

    def get(self, key: str) -> Loaded:
        """What runs ``key``'s requests; ``""`` is the base. Raises ValueError / CharacterChanged (see the
        store)."""
        if not key:
            return self.base
        with self._lock:
            found = self._loaded.get(key)
            if found is not None:
                self._loaded.move_to_end(key)
                return found
        loaded = self._load(key)
        with self._lock:
            self._loaded[key] = loaded
            self._loads += loaded.form != "base"
            self._evict(loaded.form, keep=key)
        return loaded

    def _load(self, key: str) -> Loaded:
        import onnxruntime as ort  # noqa: PLC0415

        weights = self.store.weights_of(key, self.model)
        if weights is None:
            # a character without weights of its own for this model (cached: no re-read per step)
            return self.base
        form, path = weights
        if self.plans:
            plan = plan_path(self.store.directory / parse_key(key)[0], self.model)
            log.info("%s: loading the TensorRT plan of %s", self.model, key)
            return Loaded(self.open_session(plan), None, _file_bytes(plan), "graph")
        size = _file_bytes(path)
        if form == "adapter":
            adapter = ort.LoraAdapter()
            adapter.Load(str(path))
            options = ort.RunOptions()
            options.add_active_adapter(adapter)
            log.info("%s: loaded the adapter of %s (%d bytes)", self.model, key, size)
            return Loaded(self.base.session, options, size, form, adapter)
        log.info("%s: loading the own graph of %s (%d bytes)", self.model, key, size)
        return Loaded(self.open_session(path), None, size, form)

    def _evict(self, form: str, keep: str) -> None:
        """Drop least recently used entries of ``form`` until they fit its budget (never the one just
        loaded)."""
        while len(self._loaded) > MAX_ENTRIES:
            self._loaded.popitem(last=False)
        budget = self.budgets.get(form)
        if budget is None:
            return
        while self._bytes(form) > budget:
            victim = next((k for k, v in self._loaded.items() if v.form == form and k != keep), None)
            if victim is None:
                break
            del self._loaded[victim]
            self._evictions += 1
            log.info("%s: unloaded %s's %s (least recently used; budget %d bytes)", self.model, victim, form,
                     budget)

    def _bytes(self, form: str) -> int:
        return sum(v.nbytes for v in self._loaded.values() if v.form == form)

    def stats(self) -> WeightsStats:
        with self._lock:
            return WeightsStats(self._loads, self._evictions, self._bytes("adapter"), self._bytes("graph"))
