"""Start a real Triton Inference Server on a model repository, without a container.

The PyPI wheel ``nvidia-pytriton`` ships a complete ``tritonserver`` (2.51) with the Python backend and one
backend stub per CPython version. This module finds that binary (or a ``tritonserver`` already on PATH, as in
the NGC container), lays out a backend folder whose Python stub matches the running interpreter, and runs
Triton with the project's environment first on PATH: the stub embeds the first ``python3`` it finds there, and
the Python models must import ``isekai`` and numpy<2 from this very environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from isekai import constants as C
from isekai.ensemble.admission import metrics_url

_CACHE_ROOT = Path(os.environ.get("ISEKAI_CACHE", Path.home() / ".cache" / "isekai"))


@dataclass(frozen=True)
class TritonInstall:
    """Where a runnable tritonserver and its backends are."""

    binary: Path
    backend_dir: Path
    library_dirs: tuple[Path, ...] = ()


def _pytriton_install() -> TritonInstall | None:
    try:
        import pytriton  # noqa: PLC0415 - optional: the NGC container has no pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.exists():
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(
            f"nvidia-pytriton has no Python-backend stub for Python {version} (looked for {stub}); "
            "use a Python it ships a stub for (3.8-3.13)"
        )
    # The wheel keeps its stubs apart: Triton wants the one stub beside libtriton_python.so.
    backend_dir = _CACHE_ROOT / f"triton-backends-py{version}"
    python_dir = backend_dir / "python"
    marker = python_dir / ".source"
    source = f"{root}:{stub.stat().st_mtime_ns}"
    if not marker.exists() or marker.read_text() != source:
        if backend_dir.exists():
            shutil.rmtree(backend_dir)
        shutil.copytree(root / "backends", backend_dir)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
        marker.write_text(source)
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary=binary, backend_dir=backend_dir,
                         library_dirs=(libs,) if libs.exists() else ())


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver: the nvidia-pytriton wheel first, then one on PATH (NGC container)."""
    install = _pytriton_install()
    if install is not None:
        return install
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(binary=Path(on_path), backend_dir=Path("/opt/tritonserver/backends"))
    raise RuntimeError(
        "no tritonserver found: install the project (it brings nvidia-pytriton) or run inside the NGC "
        "Triton container where tritonserver is on PATH"
    )


@dataclass
class ServerOptions:
    """How to run Triton. Ports of 0 are not allowed by Triton: pick free ones with :func:`free_port`."""

    repository: Path | str  # a folder, or a Triton cloud-storage URL (see :func:`is_remote_repository`)
    host: str = C.DEFAULT_HOST
    grpc_port: int = C.DEFAULT_GRPC_PORT
    http_port: int = C.DEFAULT_HTTP_PORT
    metrics_port: int = C.DEFAULT_METRICS_PORT
    model_config_name: str | None = None
    model_control: str = "none"  # "explicit" enables load/unload through the repository API
    load_models: tuple[str, ...] = ()  # with explicit control: what to load at start ("*" for all)
    admin_key: str | None = None  # protects the model-repository, trace and logging APIs (restricted header)
    log_verbose: int = 0
    exit_timeout_s: int = 30
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # glibc's MALLOC_MMAP_THRESHOLD_ for tritonserver and every stub (bytes; None: glibc's dynamic default). A
    # value in the caller's environment wins.
    malloc_mmap_threshold: int | None = C.MALLOC_MMAP_THRESHOLD

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={repository_argument(self.repository)}",
            f"--backend-directory={install.backend_dir}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            f"--model-control-mode={self.model_control}",
        ]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        for name in self.load_models:
            cmd.append(f"--load-model={name}")
        if self.admin_key:
            header, value = admin_header(self.admin_key)
            apis = ",".join(C.RESTRICTED_APIS)
            cmd.append(f"--grpc-restricted-protocol={apis}:{header}={value}")
            cmd.append(f"--http-restricted-api={apis}:{header}={value}")
        cmd.extend(self.extra_args)
        return cmd

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        # The stub embeds the first python3 on PATH: make it this environment's.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        dirs = [*_libpython_dirs(), *install.library_dirs]
        libs = os.pathsep.join(str(p) for p in dirs)
        if libs:
            env["LD_LIBRARY_PATH"] = f"{env['LD_LIBRARY_PATH']}{os.pathsep}{libs}" if env.get(
                "LD_LIBRARY_PATH"
            ) else libs
        # Python models import onnxruntime and torch: one thread pool each per stub would oversubscribe.
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        if self.malloc_mmap_threshold is not None:
            # onnxruntime without its arena hands every activation buffer back to malloc after a run; glibc's
            # default raises its mmap threshold up to 32 MiB as big blocks are freed, so later buffers come
            # from the heap and stay resident. A fixed threshold returns them: the server's peak -12 % on the
            # full-size models at no time cost beyond the host's noise (bench/results/server-memory-vit_h.md).
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(self.malloc_mmap_threshold))
        # prepare reads diffusion's queue from this server's own metrics (ensemble/admission.py).
        env[C.METRICS_URL_ENV] = metrics_url(self.host, self.metrics_port)
        return env


def is_remote_repository(repository: Path | str) -> bool:
    """Whether ``repository`` names object storage that Triton reads itself (``s3://``, ``gs://``, ``as://``)."""
    return str(repository).startswith(C.REMOTE_REPOSITORY_SCHEMES)


def repository_argument(repository: Path | str) -> str:
    """``--model-repository``'s value: a cloud URL as it is, a folder as an absolute path."""
    return str(repository) if is_remote_repository(repository) else str(Path(repository).resolve())


def admin_header(admin_key: str) -> tuple[str, str]:
    """``"HEADER=VALUE"`` or ``"VALUE"`` (header :data:`isekai.constants.ADMIN_KEY_HEADER`) ->
    ``(header, value)``."""
    header, _, value = admin_key.partition("=")
    if not value:
        header, value = C.ADMIN_KEY_HEADER, header
    if not header or not value:
        raise ValueError(f"admin key must be HEADER=VALUE or VALUE, not {admin_key!r}")
    return header, value


def _libpython_dirs() -> list[Path]:
    """The running interpreter's own libpython, for the stub to load.

    The stub links ``libpython3.X.so.1.0`` by soname; without this the loader may find another build of the
    same minor version (e.g. the OS's 3.11.2 beside a pyenv 3.11.7), and extension modules of this interpreter
    then fail with undefined symbols (seen: ``_ssl`` needing ``_PyModule_Add``, so ``import diffusers`` failed
    in a stub).
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        return [Path(libdir)]
    return []


class TritonServer:
    """A tritonserver child process: start, wait until ready, stop with a grace period."""

    def __init__(self, options: ServerOptions, log_path: Path | None = None) -> None:
        self.options = options
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        return metrics_url(self.options.host, self.options.metrics_port)

    def start(self) -> None:
        install = find_tritonserver()
        cmd = self.options.command(install)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            cmd,
            env=self.options.environment(install),
            stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file else None,
            start_new_session=True,  # its own process group: stop() reaches the stubs too
        )

    def is_ready(self) -> bool:
        """Models ready and every endpoint listening. Triton opens gRPC, then HTTP, then metrics, so HTTP's
        readiness alone left a moment where /metrics refused connections (seen in CI, reading metrics at
        once)."""
        return answers(f"http://{self.http_url}/v2/health/ready") and answers(self.metrics_url)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready"
                    + (f"; see its log {self.log_path}" if self.log_path else "")
                    + self._log_tail()
                )
            if self.is_ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f}s" + self._log_tail())

    def _log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- server log tail ---\n" + "\n".join(tail)

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGINT the server (it drains and unloads), escalate to SIGKILL of the group after ``grace_s``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Stubs are children in the server's process group: none may outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(grace_s=5)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def answers(url: str) -> bool:
    """GET ``url`` answers 200 (within 2 s)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((C.DEFAULT_HOST, 0))
        return s.getsockname()[1]
