"""isekai_characters: the registered characters as JSON (name, kind, prompt, default, bytes; ``problem`` if
not drawable)."""

from __future__ import annotations

import json
from pathlib import Path

from isekai.ensemble.characters import CharacterStore, check_character_name
from isekai.serving import triton


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.name = args["model_name"]
        self.store = CharacterStore(Path(args["model_repository"]).parent)

    def execute(self, requests: list) -> list:
        return triton.respond_each(requests, self._handle, self.name)

    def _handle(self, request) -> list:
        wanted = triton.optional_text(request, "name")
        infos = self.store.infos()
        if wanted:
            check_character_name(wanted)
            infos = [i for i in infos if i.name == wanted]
            if not infos:
                raise ValueError(f"character {wanted!r} is not registered; known: "
                                 f"{', '.join(self.store.names()) or '(none)'}")
        text = json.dumps([i.as_dict() for i in infos], ensure_ascii=False)
        return [triton.bytes_tensor("characters", text.encode("utf-8"))]
