"""embedding_cache: the SAM embedding cache (:class:`isekai.ensemble.cache.EmbeddingCache`) as a model of its
own, looked up and filled by preprocess through BLS, with its counters on the metrics port."""

from __future__ import annotations

import numpy as np

from isekai import constants as C
from isekai.ensemble.cache import EmbeddingCache
from isekai.serving import metrics, triton


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = triton.parameters(triton.load_config(args))
        self.cache = EmbeddingCache(
            int(params.get("cache_entries", C.EMBEDDING_CACHE_ENTRIES)),
            int(params.get("cache_bytes", C.EMBEDDING_CACHE_BYTES)),
        )
        self.name = args["model_name"]
        self.metrics = metrics.cache_metrics(self.name)
        self.miss = np.zeros(
            (0, C.SAM_EMBEDDING_CHANNELS, C.SAM_EMBEDDING_SIZE, C.SAM_EMBEDDING_SIZE), np.float32
        )

    def execute(self, requests: list) -> list:
        responses = triton.respond_each(requests, self._handle, self.name)
        self.metrics.update(self.cache.stats())
        return responses

    def _handle(self, request) -> list:
        key = triton.optional_text(request, "key")
        if not key:
            raise ValueError("input 'key' is required")
        embeddings = triton.optional_input(request, C.SAM_ENC_OUT_EMBEDDINGS)
        if embeddings is not None:  # a store
            found, value = self.cache.put(key, embeddings), self.miss
        else:
            value = self.cache.get(key)
            found, value = value is not None, self.miss if value is None else value
        out = {C.SAM_ENC_OUT_EMBEDDINGS: value, "found": np.array([found])}
        wanted = set(request.requested_output_names())
        return [triton.tensor(name, array) for name, array in out.items() if name in wanted]
