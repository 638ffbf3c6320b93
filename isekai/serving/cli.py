"""``isekai serve``: run the embedded Triton server on a model repository until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from isekai import constants as C
from isekai.serving.server import ServerOptions, TritonServer


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
        "--model-control", choices=("none", "explicit"), default="none",
        help="explicit enables load/unload through the repository API (protect it with --admin-key)",
    )
    parser.add_argument(
        "--admin-key", default=None,
        help="HEADER=VALUE (or VALUE for header isekai-admin-key) required on model-repository API calls",
    )
    parser.add_argument(
        "--grace", type=float, default=60.0,
        help="seconds in-flight requests get to finish after SIGTERM/SIGINT before the server is killed",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton log verbosity (0 = info)")
    parser.add_argument("--log-file", type=Path, default=None, help="write the server log here instead of stdout")


def main(args: argparse.Namespace) -> int:
    if not args.repository.is_dir():
        print(f"isekai serve: model repository {args.repository} is not a folder", file=sys.stderr)
        return 2
    options = ServerOptions(
        repository=args.repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_config_name=args.profile,
        model_control=args.model_control,
        load_models=("*",) if args.model_control == "explicit" else (),
        admin_key=args.admin_key,
        log_verbose=args.log_verbose,
        exit_timeout_s=int(args.grace),
    )
    server = TritonServer(options, log_path=args.log_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        server.wait_ready()
    except (RuntimeError, TimeoutError) as err:
        print(f"isekai serve: {err}", file=sys.stderr)
        server.stop(grace_s=5)
        return 1
    print(
        f"isekai serving {args.repository}: gRPC {server.grpc_url}, HTTP {server.http_url}, "
        f"metrics {server.metrics_url}",
        flush=True,
    )
    while not stop.wait(0.5):
        if server.process.poll() is not None:
            print(f"isekai serve: tritonserver exited with code {server.process.returncode}", file=sys.stderr)
            return 1
    print("isekai serve: draining in-flight requests, then stopping", flush=True)
    code = server.stop(grace_s=args.grace)
    return 0 if code in (0, -signal.SIGINT) else 1
