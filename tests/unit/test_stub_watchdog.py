"""The stub watchdog's rules on made-up process tables: which disappearances are crashes and which are
unloads."""

from __future__ import annotations

import pytest

from isekai.serving import stubs
from isekai.serving.stubs import StubProcess, StubWatchdog

SERVER = 100


def alive(pid: int, model: str) -> StubProcess:
    return StubProcess(pid, SERVER, model, f"/repo/{model}/1/model.py", zombie=False)


def zombie(pid: int) -> StubProcess:
    return StubProcess(pid, SERVER, "", "", zombie=True)


@pytest.fixture
def table(monkeypatch):
    current: list[StubProcess] = []
    monkeypatch.setattr(stubs, "server_stubs", lambda pid: list(current) if pid == SERVER else [])
    return current


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_zombie_is_reported_once_it_stays_a_zombie(table, clock):
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True, confirm_s=5.0, clock=clock)
    table[:] = [alive(1, "unet"), alive(2, "lama")]
    assert watchdog.check() == []
    table[:] = [zombie(1), alive(2, "lama")]
    assert watchdog.check() == []
    clock.now += 5
    assert watchdog.check() == ["unet"]
    assert "pid 1" in watchdog.reasons["unet"] and "zombie for 5.0 s" in watchdog.reasons["unet"]
    clock.now += 5
    assert watchdog.check() == []
    table[:] = [alive(3, "unet"), alive(2, "lama")]  # the reload reaped the zombie and started a new stub
    assert watchdog.check() == []
    assert watchdog.reasons == {}


def test_a_stub_caught_a_moment_before_triton_reaped_it_is_not_a_crash(table, clock):
    """Seen in CI under load: a reload's old stub exited normally and a scan caught it as a zombie."""
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True, confirm_s=5.0, clock=clock)
    table[:] = [alive(1, "sam_decoder"), alive(2, "sam_decoder")]  # the old instance and the new one
    watchdog.check()
    table[:] = [zombie(1), alive(2, "sam_decoder")]
    assert watchdog.check() == []
    clock.now += 0.5
    table[:] = [alive(2, "sam_decoder")]
    assert watchdog.check() == []
    clock.now += 10
    assert watchdog.check() == []


def test_a_stub_reaped_by_triton_while_its_model_is_loaded_is_reported_once_it_stays_stubless(table, clock):
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True, confirm_s=5.0, clock=clock)
    table[:] = [alive(1, "echo"), alive(2, "sleeper")]
    watchdog.check()
    table[:] = [alive(2, "sleeper")]
    assert watchdog.check() == []
    clock.now += 4.9
    assert watchdog.check() == []
    clock.now += 0.1
    assert watchdog.check() == ["echo"]
    assert "no live stub for 5.0 s" in watchdog.reasons["echo"] and "pid 1" in watchdog.reasons["echo"]
    clock.now += 10
    assert watchdog.check() == []


def test_a_reload_that_leaves_the_model_stubless_for_a_moment_is_not_a_crash(table, clock):
    """Seen in CI: between a reload's config stub and its new instance's stub, a loaded model had none."""
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True, confirm_s=5.0, clock=clock)
    table[:] = [alive(1, "sam_decoder"), alive(8, "sam_decoder")]  # the serving stub and a config stub
    watchdog.check()
    table[:] = []
    assert watchdog.check() == []
    clock.now += 2
    table[:] = [alive(9, "sam_decoder")]  # the new instance
    assert watchdog.check() == []
    clock.now += 10
    assert watchdog.check() == []


def test_a_model_unloaded_while_stubless_is_not_a_crash(table, clock):
    states = {"echo": "READY"}
    watchdog = StubWatchdog(SERVER, loaded=lambda model: states.get(model) == "READY", confirm_s=5.0,
                            clock=clock)
    table[:] = [alive(1, "echo")]
    watchdog.check()
    table[:] = []
    assert watchdog.check() == []
    states["echo"] = "UNAVAILABLE"
    clock.now += 10
    assert watchdog.check() == []


def test_a_reload_that_replaces_the_stub_is_not_a_crash(table):
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True)
    table[:] = [alive(1, "echo")]
    watchdog.check()
    table[:] = [alive(5, "echo")]
    assert watchdog.check() == []


def test_a_reload_seen_in_two_steps_is_not_a_crash(table):
    """The new stub shows up in one check and the old one is gone only in the next."""
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True)
    table[:] = [alive(1, "sam_decoder")]
    watchdog.check()
    table[:] = [alive(1, "sam_decoder"), alive(7, "sam_decoder")]
    assert watchdog.check() == []
    table[:] = [alive(7, "sam_decoder")]
    assert watchdog.check() == []


def test_a_short_lived_stub_beside_the_serving_one_is_not_a_crash(table):
    """Loading a model (a reload's new version) runs a stub for its config that exits on its own."""
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True)
    table[:] = [alive(1, "sam_decoder")]
    watchdog.check()
    table[:] = [alive(1, "sam_decoder"), alive(8, "sam_decoder")]
    assert watchdog.check() == []
    table[:] = [alive(1, "sam_decoder")]
    assert watchdog.check() == []


def test_one_of_two_instances_of_unknown_name_vanishing_is_left_to_the_zombie_rule(table, clock):
    """Without instance names (a command line that does not say), another live stub keeps the model serving; a
    dead instance that stays a zombie is still reported."""
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True, confirm_s=5.0, clock=clock)
    table[:] = [alive(1, "diffusion"), alive(2, "diffusion")]
    watchdog.check()
    table[:] = [alive(2, "diffusion")]
    assert watchdog.check() == []
    table[:] = [zombie(2)]
    assert watchdog.check() == []
    clock.now += 5
    assert watchdog.check() == ["diffusion"]


def test_an_unload_is_not_a_crash(table):
    states = {"echo": "READY"}
    watchdog = StubWatchdog(SERVER, loaded=lambda model: states.get(model) == "READY")
    table[:] = [alive(1, "echo")]
    watchdog.check()
    states["echo"] = "UNAVAILABLE"
    table[:] = []
    assert watchdog.check() == []


def test_without_the_loaded_check_only_zombies_count(table, clock):
    watchdog = StubWatchdog(SERVER, confirm_s=5.0, clock=clock)
    table[:] = [alive(1, "echo"), alive(2, "unet")]
    watchdog.check()
    table[:] = [zombie(2)]
    assert watchdog.check() == []
    clock.now += 5
    assert watchdog.check() == ["unet"]


def instance(pid: int, name: str) -> StubProcess:
    """A live stub whose command line names its instance (``diffusion_0_1``) or, for a config stub, its
    model."""
    model = name.rsplit("_", 2)[0] if name.count("_") >= 2 and name.rsplit("_", 1)[1].isdigit() else name
    return StubProcess(pid, SERVER, model, f"/repo/{model}/1/model.py", zombie=False, instance=name)


def test_one_of_two_instances_reaped_while_the_other_serves_is_reported(table, clock):
    """A request reached the dead instance first and Triton reaped it: the other instance's stub does not hide
    it."""
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True, confirm_s=5.0, clock=clock)
    table[:] = [instance(1, "diffusion_0_0"), instance(2, "diffusion_0_1")]
    watchdog.check()
    table[:] = [instance(1, "diffusion_0_0")]
    assert watchdog.check() == []
    clock.now += 4.9
    assert watchdog.check() == []
    clock.now += 0.1
    assert watchdog.check() == ["diffusion"]
    assert (
        "instance diffusion_0_1" in watchdog.reasons["diffusion"] and "pid 2" in watchdog.reasons["diffusion"]
    )
    clock.now += 10
    assert watchdog.check() == []
    # reload
    table[:] = [instance(1, "diffusion_0_0"), instance(3, "diffusion_0_0"), instance(4, "diffusion_0_1")]
    assert watchdog.check() == []
    table[:] = [instance(3, "diffusion_0_0"), instance(4, "diffusion_0_1")]
    clock.now += 10
    assert watchdog.check() == []


def test_a_reload_of_a_two_instance_model_is_not_a_crash(table, clock):
    """The new instances (same names), the config stub, then the old instances go: one after the other."""
    watchdog = StubWatchdog(SERVER, loaded=lambda model: True, confirm_s=5.0, clock=clock)
    table[:] = [instance(1, "diffusion_0_0"), instance(2, "diffusion_0_1")]
    watchdog.check()
    table[:] = [instance(1, "diffusion_0_0"), instance(2, "diffusion_0_1"), instance(9, "diffusion")]
    watchdog.check()
    table[:] = [instance(1, "diffusion_0_0"), instance(2, "diffusion_0_1"), instance(3, "diffusion_0_0")]
    watchdog.check()
    table[:] = [instance(2, "diffusion_0_1"), instance(3, "diffusion_0_0")]
    clock.now += 1
    watchdog.check()
    table[:] = [instance(3, "diffusion_0_0")]  # the old 0_1 went before the new 0_1 came
    clock.now += 2
    assert watchdog.check() == []
    table[:] = [instance(3, "diffusion_0_0"), instance(4, "diffusion_0_1")]
    clock.now += 10
    assert watchdog.check() == []


def test_an_instance_gone_with_its_model_unloaded_is_not_a_crash(table, clock):
    states = {"diffusion": "READY"}
    watchdog = StubWatchdog(SERVER, loaded=lambda model: states.get(model) == "READY", confirm_s=5.0,
                            clock=clock)
    table[:] = [instance(1, "diffusion_0_0"), instance(2, "diffusion_0_1")]
    watchdog.check()
    table[:] = [instance(1, "diffusion_0_0")]
    watchdog.check()
    states["diffusion"] = "UNLOADING"
    clock.now += 10
    assert watchdog.check() == []
