"""``isekai serve``: run the embedded Triton server on a model repository until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import threading
from pathlib import Path

from isekai import constants as C
from isekai.serving.server import ServerOptions
from isekai.serving.supervisor import Supervisor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="the model repository")
    parser.add_argument(
        "--host", default=C.DEFAULT_HOST,
        help=f"address to listen on (default {C.DEFAULT_HOST}: loopback only; 0.0.0.0 to expose)",
    )
    parser.add_argument("--grpc-port", type=int, default=C.DEFAULT_GRPC_PORT, help="gRPC port")
    parser.add_argument("--http-port", type=int, default=C.DEFAULT_HTTP_PORT, help="HTTP port")
    parser.add_argument("--metrics-port", type=int, default=C.DEFAULT_METRICS_PORT, help="Prometheus metrics port")
    parser.add_argument(
        "--profile", default=None,
        help="model config profile: reads <model>/configs/PROFILE.pbtxt where present (e.g. gpu); default config.pbtxt",
    )
    parser.add_argument(
        "--admin-key", default=None,
        help="HEADER=VALUE (or VALUE for header isekai-admin-key): callers sending it may use the model-repository "
        "API (load/unload/index); without this flag that API is closed to every caller",
    )
    parser.add_argument(
        "--grace", type=float, default=60.0,
        help="seconds in-flight requests get to finish after SIGTERM/SIGINT before the server is killed "
        "(readiness goes false and new requests are refused at once)",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton log verbosity (0 = info)")
    parser.add_argument("--log-file", type=Path, default=None, help="write the server log here instead of stdout")


def main(args: argparse.Namespace) -> int:
    if not args.repository.is_dir():
        print(f"isekai serve: model repository {args.repository} is not a folder", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="isekai serve: %(levelname)s %(message)s")
    options = ServerOptions(
        repository=args.repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_config_name=args.profile,
        # Explicit control behind a key: how the supervisor reloads a model whose stub died and drains on exit.
        model_control="explicit",
        load_models=("*",),
        admin_key=args.admin_key or secrets.token_urlsafe(24),
        log_verbose=args.log_verbose,
        exit_timeout_s=max(int(args.grace), 1),
    )
    try:
        supervisor = Supervisor(options, log_path=args.log_file)
    except ValueError as err:  # a malformed --admin-key
        print(f"isekai serve: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        supervisor.start()
    except (RuntimeError, TimeoutError) as err:
        print(f"isekai serve: {err}", file=sys.stderr)
        return 1
    server = supervisor.server
    print(
        f"isekai serving {args.repository}: gRPC {server.grpc_url}, HTTP {server.http_url}, "
        f"metrics {server.metrics_url}",
        flush=True,
    )
    code = supervisor.run(stop, grace_s=args.grace)
    print(f"isekai serve: stopped (exit code {code})", flush=True)
    return code
