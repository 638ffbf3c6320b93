"""``isekai web --url HOST:8001 [--host 127.0.0.1 --port 7860]``: the page, in front of a running isekai
server."""

from __future__ import annotations

import argparse
import threading
import time

from isekai import constants as C


class PageServer:
    """The page's app under uvicorn in a background thread (``isekai demo --web`` and the browser tests)."""

    def __init__(self, url: str, host: str = C.DEFAULT_WEB_HOST, port: int = C.DEFAULT_WEB_PORT) -> None:
        import uvicorn  # noqa: PLC0415

        from isekai.client.web.app import create_app  # noqa: PLC0415

        self.host, self.port = host, port
        config = uvicorn.Config(create_app(url), host=host, port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="isekai-web", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout_s: float = 30.0) -> PageServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the page did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> PageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=f"localhost:{C.DEFAULT_GRPC_PORT}",
        help="the isekai server's gRPC address; several comma-separated (or dns:///HOST:PORT): round-robin",
    )
    parser.add_argument("--host", default=C.DEFAULT_WEB_HOST,
                        help=f"address the page listens on (default {C.DEFAULT_WEB_HOST}; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=C.DEFAULT_WEB_PORT, help="port the page listens on")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a swap may take before it is abandoned")


def main(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415

    from isekai.client.web.app import create_app  # noqa: PLC0415

    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"isekai web: http://{host}:{args.port}/ (talking to {args.url}; Ctrl-C stops)", flush=True)
    app = create_app(args.url, timeout_s=args.timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
