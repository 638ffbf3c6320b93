"""``isekai serve``: run the embedded Triton server on a model repository until SIGTERM/SIGINT.

Flags after ``--`` go to tritonserver as they are (after isekai's own, so they win where they repeat one; the
ports and host must be given with isekai's flags, which the supervisor itself uses). The container image of
``k8s/`` runs this command, so pods get the same stub watchdog and drain as a single machine.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import threading
from pathlib import Path

from isekai import constants as C
from isekai.serving.server import ServerOptions, is_remote_repository
from isekai.serving.supervisor import Supervisor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository", default="model_repository",
        help="the model repository: a folder, or s3://, gs://, as:// object storage that Triton reads itself",
    )
    parser.add_argument(
        "--host", default=C.DEFAULT_HOST,
        help=f"address to listen on (default {C.DEFAULT_HOST}: loopback only; 0.0.0.0 to expose)",
    )
    parser.add_argument("--grpc-port", type=int, default=C.DEFAULT_GRPC_PORT, help="gRPC port")
    parser.add_argument("--http-port", type=int, default=C.DEFAULT_HTTP_PORT, help="HTTP port")
    parser.add_argument("--metrics-port", type=int, default=C.DEFAULT_METRICS_PORT,
                        help="Prometheus metrics port")
    parser.add_argument(
        "--profile", default=None,
        help="model config profile: reads <model>/configs/PROFILE.pbtxt where present (e.g. gpu); default "
             "config.pbtxt",
    )
    parser.add_argument(
        "--admin-key", default=None,
        help="HEADER=VALUE (or VALUE for header isekai-admin-key): callers sending it may use the "
        "model-repository API (load/unload/index); without this flag that API is closed to every caller",
    )
    parser.add_argument(
        "--grace", type=float, default=C.DEFAULT_DRAIN_GRACE_S,
        help="seconds in-flight requests get to finish after SIGTERM/SIGINT before the server is killed "
        "(readiness goes false and new requests are refused at once)",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton log verbosity (0 = info)")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="write the server log here instead of stdout")
    parser.add_argument(
        "triton_args", nargs=argparse.REMAINDER, metavar="-- TRITON_FLAG",
        help="after --: more tritonserver flags, e.g. -- --grpc-max-connection-age=300000",
    )


def main(args: argparse.Namespace) -> int:
    repository = args.repository if is_remote_repository(args.repository) else Path(args.repository)
    if isinstance(repository, Path) and not repository.is_dir():
        print(f"isekai serve: model repository {repository} is not a folder (nor an s3://, gs:// or as:// "
              "URL)",
              file=sys.stderr)
        return 2
    triton_args = tuple(args.triton_args[1:] if args.triton_args[:1] == ["--"] else args.triton_args)
    if triton_args and not triton_args[0].startswith("-"):
        print(f"isekai serve: unexpected argument {triton_args[0]!r} (tritonserver flags go after --)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="isekai serve: %(levelname)s %(message)s")
    options = ServerOptions(
        repository=repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_config_name=args.profile,
        # Explicit control behind a key: how the supervisor reloads a model whose stub died and drains on
        # exit.
        model_control="explicit",
        load_models=("*",),
        admin_key=args.admin_key or secrets.token_urlsafe(24),
        log_verbose=args.log_verbose,
        exit_timeout_s=max(int(args.grace), 1),
        extra_args=triton_args,
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
