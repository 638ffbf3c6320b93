"""The ``isekai`` command line: a thin shell over functions the tests call directly."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module with add_arguments(parser) and main(args) -> int. Imported lazily: the client
# commands must not pay for torch.
COMMANDS = {
    "export": ("isekai.export.cli", "export checkpoints to ONNX into a Triton model repository"),
    "character": ("isekai.export.characters", "register, list and remove characters; train one from photos"),
    "serve": ("isekai.serving.cli", "run the embedded Triton server on a model repository"),
    "run": ("isekai.client.cli_run", "send a photo and clicks, get the scene with the character"),
    "segment": ("isekai.client.cli_segment", "send a photo and clicks, get the person mask only"),
    "demo": ("isekai.demo", "make small checkpoints, serve them, send one real photo"),
    "load": ("isekai.client.cli_load", "a bounded load run: concurrent clients, counts and latencies"),
    "web": ("isekai.client.web.cli", "the page: upload, click the person, pick a character, watch the swap"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that sub-command's flags are loaded (``isekai run`` never imports
    torch)."""
    parser = argparse.ArgumentParser(prog="isekai", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
