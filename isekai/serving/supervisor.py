"""What ``isekai serve`` does around tritonserver: reload a model whose stub died, and drain on shutdown.

Both need Triton's model-repository API, so the server runs with explicit model control (every model loaded at
start) and that API behind an admin header: the operator's ``--admin-key``, or a random key only this process
knows, so that by default no caller can load or unload models.

Shutdown, as seen on Triton 2.51: on SIGINT/SIGTERM Triton first closes its HTTP listener and waits for open
HTTP connections, while gRPC keeps taking new requests and still reports ready; only then does it refuse new
work and wait for in-flight requests. So :meth:`Supervisor.drain` first unloads the public models: readiness
turns false on both protocols and new requests are refused at once, while requests already inside them finish
(Triton unloads a model when its last request is done). When both are gone, or the grace is spent, Triton gets
SIGINT for the rest.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from isekai import constants as C
from isekai.serving.repository import RepositoryAPI, RepositoryError
from isekai.serving.server import ServerOptions, TritonServer, admin_header
from isekai.serving.stubs import StubWatchdog

log = logging.getLogger("isekai.serve")

_BUSY_STATES = ("READY", "LOADING", "UNLOADING")


class Supervisor:
    """A tritonserver plus its watchdog and drain. ``options`` must use explicit model control and an admin
    key."""

    def __init__(self, options: ServerOptions, log_path: Path | None = None) -> None:
        if options.model_control != "explicit" or not options.admin_key:
            raise ValueError("the supervisor needs model_control='explicit' and an admin_key")
        self.server = TritonServer(options, log_path=log_path)
        self.repository = RepositoryAPI(_local_url(options.host, options.http_port),
                                        *admin_header(options.admin_key))
        self.watchdog: StubWatchdog | None = None
        self.restarts: list[str] = []  # models reloaded after a stub died, in order

    def start(self, timeout_s: float = 600.0) -> None:
        """Start Triton and wait until it is ready; the watchdog learns every stub while the models load."""
        self.server.start()
        self.watchdog = StubWatchdog(self.server.process.pid, loaded=self._loaded)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                self.watchdog.check()
                remaining = deadline - time.monotonic()
                try:
                    self.server.wait_ready(timeout_s=min(1.0, max(remaining, 0.0)))
                    break
                except TimeoutError:
                    if remaining <= 1.0:
                        raise
        except BaseException:
            self.server.stop(grace_s=5)
            raise
        self.watchdog.check()

    def run(self, stop: threading.Event, grace_s: float, interval_s: float = C.SUPERVISOR_INTERVAL_S) -> int:
        """Watch the server until ``stop`` is set, then drain; the exit code for ``isekai serve``."""
        try:
            while not stop.wait(interval_s):
                if self.server.process.poll() is not None:
                    log.error("tritonserver exited with code %s", self.server.process.returncode)
                    self.server.stop(grace_s=0)  # its stubs must not outlive it
                    return 1
                try:
                    self.check_stubs()
                except Exception:  # the watchdog failing must not stop the serving
                    log.exception("stub watchdog")
            return self.drain(grace_s)
        finally:
            if self.server.process.poll() is None:  # an unexpected error above: never leave Triton behind
                self.server.stop(grace_s=5)

    def _loaded(self, model: str) -> bool:
        try:
            return self.repository.states().get(model) == "READY"
        except RepositoryError as err:
            log.warning("stub watchdog: %s", err)
            return False

    def check_stubs(self) -> list[str]:
        """Reload every model whose stub died since the last check; returns those models."""
        dead = self.watchdog.check() if self.watchdog else []
        for model in dead:
            log.error("a Python-backend stub of model '%s' died (%s); reloading the model", model,
                      self.watchdog.reasons[model])
            try:
                self.repository.reload(model)
                self.restarts.append(model)
                log.warning("model '%s' reloaded with a new stub", model)
            except RepositoryError as err:
                log.error("could not reload '%s': %s", model, err)
        return dead

    def drain(self, grace_s: float) -> int:
        """Refuse new requests, let in-flight ones finish within ``grace_s`` seconds, stop.

        Returns 0 when every request inside the public models finished, 1 when the grace ran out first (or the
        server could not be drained). Once they are done Triton unloads the rest; an instance whose stub died
        never finishes unloading on this build, so after ``SHUTDOWN_UNLOAD_S`` the process group is killed:
        nothing is in flight any more by then.
        """
        deadline = time.monotonic() + grace_s
        for model in C.PUBLIC_MODELS:
            try:
                self.repository.unload(model)
            except RepositoryError as err:
                log.warning("drain: %s", err)
        drained = False
        while time.monotonic() < deadline and self.server.process.poll() is None:
            try:
                states = self.repository.states()
            except RepositoryError as err:
                log.warning("drain: %s", err)
                break
            if not any(states.get(m) in _BUSY_STATES for m in C.PUBLIC_MODELS):
                drained = True
                break
            time.sleep(0.2)
        if not drained:
            log.error("drain: requests were still in flight after the %.0f s grace", grace_s)
        unload_s = min(max(deadline - time.monotonic(), 1.0), C.SHUTDOWN_UNLOAD_S)
        code = self.server.stop(grace_s=unload_s)
        if code not in (0, -signal.SIGINT):
            log.warning("tritonserver did not finish unloading within %.0f s (exit %s); stopped it", unload_s,
                        code)
        return 0 if drained else 1


def _local_url(host: str, port: int) -> str:
    """``host:port`` this process can reach the server at (a wildcard address means this machine)."""
    if host in ("", "0.0.0.0", "::"):
        host = C.DEFAULT_HOST
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
