"""Triton's model-repository API as the supervisor uses it: list states, unload, and really reload a model.

Plain HTTP (urllib) on the server's own port, with the admin header the server was started with
(``--http-restricted-api=model-repository:HEADER=VALUE``); every call raises :class:`RepositoryError` naming
the model and Triton's answer.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from isekai import constants as C


class RepositoryError(RuntimeError):
    """A model-repository call failed (refused, unknown model, load error, server gone)."""


class RepositoryAPI:
    """Model-repository calls on ``http_url`` (``host:port``), authorised by ``header: key``."""

    def __init__(self, http_url: str, header: str, key: str, timeout_s: float = 120.0) -> None:
        self.base = f"http://{http_url}"
        self.headers = {header: key}
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None, what: str = "") -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={**self.headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            raise RepositoryError(f"{what or path}: HTTP {err.code} {detail}") from None
        except OSError as err:
            raise RepositoryError(f"{what or path}: {err}") from None
        return json.loads(text) if text else None

    def states(self) -> dict[str, str]:
        """Every model in the repository -> its state (``READY``, ``UNLOADING``, ``UNAVAILABLE``, ...)."""
        index = self._call("POST", "/v2/repository/index", {}, "repository index")
        return {entry["name"]: entry.get("state", "") for entry in index or []}

    def config(self, model: str) -> dict:
        return self._call("GET", f"/v2/models/{model}/config", what=f"config of {model}")

    def unload(self, model: str) -> None:
        """Start unloading ``model``: new requests are refused at once, those in flight finish first."""
        self._call("POST", f"/v2/repository/models/{model}/unload", {}, f"unload {model}")

    def reload(self, model: str) -> None:
        """Load ``model`` again with fresh instances (new Python-backend stubs), even if nothing changed on
        disk.

        Triton keeps the instances of a model whose config did not change, so the running config is sent back
        with :data:`isekai.constants.RELOAD_PARAMETER` changed. The old instances serve until the new ones are
        ready (Triton's own reload), and the ensembles that use ``model`` are reloaded with it.
        """
        config = self.config(model)
        config.setdefault("parameters", {})[C.RELOAD_PARAMETER] = {"string_value": f"{time.time_ns()}"}
        self._call("POST", f"/v2/repository/models/{model}/load",
                   {"parameters": {"config": json.dumps(config)}}, f"reload {model}")
