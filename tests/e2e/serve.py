"""``isekai serve`` as a subprocess of the venv's own ``isekai`` on free loopback ports, for the tests that
need the real command (its supervisor, its signal handling), not only a tritonserver."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from isekai.serving.server import answers, free_port
from isekai.serving.stubs import server_stubs

ISEKAI = Path(sys.executable).with_name("isekai")


class IsekaiServe:
    """``isekai serve --repository REPOSITORY [args]``; output (its own and Triton's log) goes to ``log``."""

    def __init__(self, repository: Path, log: Path, *args: str) -> None:
        self.repository = Path(repository)
        self.log = Path(log)
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.args = args
        self.process: subprocess.Popen | None = None
        # tritonserver's pid (its own process group: isekai serve starts it so)
        self.triton: int | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 300.0) -> IsekaiServe:
        cmd = [str(ISEKAI), "serve", "--repository", str(self.repository), "--grpc-port", str(self.grpc_port),
               "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port), *self.args]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.serving():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"isekai serve did not become ready (exit {self.process.returncode}):\n"
                                   + self.log_tail())
            time.sleep(0.3)
        self.triton = self.triton_pid()
        return self

    def serving(self) -> bool:
        """isekai serve printed its banner: Triton is ready and the supervisor watches it."""
        return self.log.exists() and b"isekai serving " in self.log.read_bytes()

    def ready(self) -> bool:
        return answers(f"http://{self.http_url}/v2/health/ready")

    def triton_pid(self) -> int:
        """The tritonserver child of the ``isekai serve`` process."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid and b"tritonserver" in cmd:
                return int(pid)
        raise RuntimeError("isekai serve has no tritonserver child")

    def processes(self) -> list[int]:
        """tritonserver and its live stubs: what must be gone once isekai serve has exited."""
        return [self.triton] + [s.pid for s in server_stubs(self.triton) if not s.zombie]

    def terminate(self, timeout_s: float = 120.0) -> int:
        """SIGTERM, as a service manager or the kubelet sends it; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        """Last resort for a failed test: nothing of this server may outlive it."""
        if self.process is None:
            return
        for group in (self.process.pid, self.triton):
            try:
                if group is not None:
                    os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        kept = [line for line in text.splitlines() if not line.startswith(("|", "+"))]  # no startup tables
        return "\n".join(kept[-lines:])


def still_running(pids: list[int], wait_s: float = 5.0) -> list[int]:
    """The ``pids`` that still exist (and are not zombies) after up to ``wait_s`` seconds: a SIGKILLed process
    takes a moment to go."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def copy_repository(source: Path, destination: Path) -> Path:
    """A private copy of a model repository (36 MB for the small checkpoints) that a test may modify."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
    return destination
