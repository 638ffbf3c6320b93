"""The Python-backend stub processes of a tritonserver, and a watchdog that notices when one dies.

Each Python-model instance runs in its own ``triton_python_backend_stub`` process, a child of tritonserver,
whose command line names the instance's ``<repository>/<model>/<version>/model.py``. Seen on Triton 2.51 (the
nvidia-pytriton build): when a stub is killed (``kill -9``, the OOM killer, a segfault in an extension),
Triton neither restarts it nor reaps it. The stub stays a zombie, every later request to that model fails with
"Stub process '<model>_0_0' is not healthy", and the server and the model still report ready. A normal unload
(or reload) reaps its stubs, so a zombie stub means a crash. But the dead stub does not always stay a zombie:
a request that reaches it first makes Triton's health check reap it (seen: the pid simply vanished, and every
later request failed the same way).

:class:`StubWatchdog` remembers which model instance each live stub serves (the stub's command line names it:
``<model>_<group>_<index>``; a config stub is named after the model) and reports a model once when one of its
stubs stays a zombie, or when an instance's stub vanishes while the model is still loaded (READY) and no new
stub of that instance appears: with two instances (``diffusion``), one reaped instance leaves the other
serving and every second request failing, so the model's other live stub does not excuse it. Stubs come and go
legitimately too: a reload starts the new instance's stub before it stops the old one, loading a model runs a
short-lived stub for its config, and an unload takes the model out of READY first. Each of those may still
show for a moment what a crash shows: a stub that exited is a zombie until Triton's ``waitpid`` returns (on a
busy machine a scan of /proc can catch it: seen in CI during a load run with reloads), and a reload may leave
its model stubless between the config stub and the new instance's. So both signs count only once they have
lasted :data:`isekai.constants.STUB_DEATH_CONFIRM_S`. ``isekai serve`` then reloads that model
(:meth:`RepositoryAPI.reload`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isekai import constants as C

_PROC = Path("/proc")
# The kernel's 15-character comm of a stub (what a zombie, whose command line is gone, still shows).
_STUB_COMM = C.PYTHON_STUB_NAME[:15]
# Where the stub's command line names its instance (see _read).
_STUB_NAME_ARG = 8


@dataclass(frozen=True)
class StubProcess:
    pid: int
    ppid: int
    model: str  # the model folder's name; "" for a zombie (its command line is gone)
    model_file: str  # the model.py path from the command line; "" for a zombie
    zombie: bool
    # The stub's name from its command line: the instance (``diffusion_0_1``), the model's name for the
    # short-lived stub that reads a model's config, "" for a zombie or where the command line does not say.
    instance: str = ""


def _read(pid: str) -> StubProcess | None:
    try:
        stat = (_PROC / pid / "stat").read_text()
        cmdline = (_PROC / pid / "cmdline").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile, or not ours to read
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    if cmdline and cmdline[0].endswith(C.PYTHON_STUB_NAME.encode()) and len(cmdline) > 1:
        model_file = cmdline[1].decode(errors="replace")
        # Triton 2.51's stub arguments: model.py, shm region, shm sizes (2), parent pid, library dir, ipc
        # handle, name
        instance = cmdline[_STUB_NAME_ARG].decode(errors="replace") if len(cmdline) > _STUB_NAME_ARG else ""
        return StubProcess(int(pid), int(ppid), Path(model_file).parent.parent.name, model_file, state == "Z",
                           instance)
    if comm == _STUB_COMM and state == "Z":
        return StubProcess(int(pid), int(ppid), "", "", True)
    return None


def all_stubs() -> list[StubProcess]:
    """Every Python-backend stub process on this machine (that this user may read), zombies included."""
    found = (_read(p) for p in os.listdir(_PROC) if p.isdigit())
    return [s for s in found if s is not None]


def server_stubs(server_pid: int) -> list[StubProcess]:
    """The stubs (live and zombie) whose parent is the tritonserver ``server_pid``."""
    return [s for s in all_stubs() if s.ppid == server_pid]


def repository_stubs(repository: Path) -> list[StubProcess]:
    """Live stubs serving a model of ``repository``, whatever their parent: after a server stopped, none may
    be left (an orphan keeps its memory and, on a GPU, its device memory)."""
    root = str(Path(repository).resolve()) + os.sep
    return [s for s in all_stubs() if s.model_file.startswith(root) and not s.zombie]


class StubWatchdog:
    """Reports each model whose stub died, once per dead stub, and says why in :attr:`reasons`.

    ``loaded(model)`` says whether Triton still has the model loaded (READY): an instance's stub that vanishes
    from a loaded model with no new stub of that instance beside it was reaped by Triton after it died, not by
    an unload or a reload, once the model has stayed loaded and that instance stubless for ``confirm_s``. A
    zombie counts once it has stayed a zombie that long (a stub stopped by an unload is reaped at once).
    Without ``loaded``, only zombies are reported. A stub whose instance is not known (``instance`` "") counts
    only when its model is left without any live stub. A reload that lowers a model's instance count looks
    like a dead instance once: the supervisor then reloads that model again, which costs a reload and nothing
    else.
    """

    def __init__(self, server_pid: int, loaded: Callable[[str], bool] | None = None,
                 confirm_s: float = C.STUB_DEATH_CONFIRM_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server_pid = server_pid
        self.loaded = loaded
        self.confirm_s = confirm_s
        self.clock = clock
        self.reasons: dict[str, str] = {}  # model -> why the last check reported it
        self._models: dict[int, str] = {}  # pid of a stub seen alive -> its model
        self._instances: dict[int, str] = {}  # pid of a stub seen alive -> its instance ("" when unknown)
        self._reported: set[int] = set()
        # pid of a stub seen as a zombie -> when that was first seen
        self._zombie_since: dict[int, float] = {}
        # (model, instance) left without a live stub while loaded -> (since, last pid); instance "": the whole
        # model
        self._orphaned: dict[tuple[str, str], tuple[float, int]] = {}

    def check(self) -> list[str]:
        """Models (sorted, without repeats) with a stub that died since the last call."""
        now = self.clock()
        self.reasons = {}
        current = server_stubs(self.server_pid)
        for stub in current:
            if stub.zombie and stub.pid in self._models and stub.pid not in self._reported:
                since = self._zombie_since.setdefault(stub.pid, now)
                if now - since >= self.confirm_s:
                    self._report(self._models[stub.pid], f"its stub (pid {stub.pid}) has been a zombie for "
                                 f"{now - since:.1f} s: it died and Triton did not restart it")
                    self._reported.add(stub.pid)
        live = {s.pid: s.model for s in current if not s.zombie}
        live_instances = {(s.model, s.instance) for s in current if not s.zombie and s.instance}
        present = {s.pid for s in current}
        for pid in [p for p in self._models if p not in present]:
            model = self._models.pop(pid)
            instance = self._instances.pop(pid, "")
            self._zombie_since.pop(pid, None)
            if pid in self._reported:  # the zombie we reported was reaped by the reload
                self._reported.discard(pid)
                continue
            if self.loaded is None or instance == model:  # a config stub exits once it has read the config
                continue
            if instance and (model, instance) not in live_instances:
                self._orphaned.setdefault((model, instance), (now, pid))
            elif not instance and model not in live.values():
                self._orphaned.setdefault((model, ""), (now, pid))
        self._confirm_orphans(set(live.values()), live_instances, now)
        for stub in current:
            if not stub.zombie and stub.pid not in self._models:
                self._models[stub.pid] = stub.model
                self._instances[stub.pid] = stub.instance
        return sorted(self.reasons)

    def _report(self, model: str, reason: str) -> None:
        self.reasons.setdefault(model, reason)

    def _confirm_orphans(self, live_models: set[str], live_instances: set[tuple[str, str]],
                         now: float) -> None:
        """Reports instances (or models) still loaded and stubless ``confirm_s`` after their stub vanished;
        forgets those that got a new stub (a reload) or were unloaded meanwhile."""
        for key, (since, pid) in list(self._orphaned.items()):
            model, instance = key
            revived = key in live_instances if instance else model in live_models
            if revived or not self.loaded(model):
                del self._orphaned[key]
            elif now - since >= self.confirm_s:
                what = f"its instance {instance}" if instance else "it"
                self._report(model,
                             f"{what} is loaded but has had no live stub for {now - since:.1f} s since its "
                             f"stub (pid {pid}) vanished: Triton reaped a dead stub")
                del self._orphaned[key]
