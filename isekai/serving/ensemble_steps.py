"""An ensemble's steps, read from its ``config.pbtxt`` and run by a Python model: how ``isekai_stream``
follows the ``isekai`` ensemble without writing the swap's stage order a second time.

:class:`EnsemblePlan` is the ensemble's ``ensemble_scheduling`` (which model each step calls, which tensors go
in and out) parsed with Triton's own protobuf (tritonclient's ``model_config_pb2``). :func:`run_plan` runs it
as Triton's ensemble scheduler does: a step starts once every tensor it reads has been written, so steps that
do not depend on each other (LaMa and diffusion) run at the same time. :class:`StreamProgress` turns finished
steps and denoising steps into a fraction that never decreases.

Plain Python: ``call`` is a BLS call in the model, a fake in unit tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isekai import constants as C


@dataclass(frozen=True)
class Step:
    """One ensemble step: the model it calls and its tensor maps."""

    model: str
    inputs: Mapping[str, str]  # the model's input name -> the ensemble tensor it reads
    outputs: Mapping[str, str]  # the model's output name -> the ensemble tensor it writes


@dataclass(frozen=True)
class EnsemblePlan:
    """An ensemble's public inputs and outputs and its steps, in the order the config lists them."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str) -> EnsemblePlan:
        """From a ``config.pbtxt``'s text; ValueError when it is not an ensemble or a step reads an unwritten
        tensor."""
        from google.protobuf import text_format  # noqa: PLC0415
        from tritonclient.grpc import model_config_pb2 as mc  # noqa: PLC0415

        config = text_format.Parse(text, mc.ModelConfig())
        if config.platform != "ensemble" or not config.ensemble_scheduling.step:
            raise ValueError(f"model config {config.name!r} is not an ensemble with steps")
        steps = tuple(
            Step(s.model_name, dict(s.input_map), dict(s.output_map)) for s in config.ensemble_scheduling.step
        )
        inputs, outputs = tuple(t.name for t in config.input), tuple(t.name for t in config.output)
        plan = cls(config.name, inputs, outputs, steps)
        plan.dependencies()  # checks the wiring
        return plan

    @classmethod
    def load(cls, path: str | Path) -> EnsemblePlan:
        return cls.parse(Path(path).read_text())

    def writers(self) -> dict[str, int]:
        """Each tensor a step writes -> that step's index."""
        return {tensor: i for i, step in enumerate(self.steps) for tensor in step.outputs.values()}

    def dependencies(self) -> list[set[int]]:
        """For each step, the steps whose outputs it reads (the ensemble's inputs come from the request)."""
        writers = self.writers()
        deps = []
        for i, step in enumerate(self.steps):
            needs = set()
            for tensor in step.inputs.values():
                if tensor in writers:
                    needs.add(writers[tensor])
                elif tensor not in self.inputs:
                    raise ValueError(f"{self.name}: step {step.model} reads {tensor!r}, which nothing writes")
            if i in needs:
                raise ValueError(f"{self.name}: step {step.model} reads its own output")
            deps.append(needs)
        for tensor in self.outputs:
            if tensor not in writers:
                raise ValueError(f"{self.name}: output {tensor!r} is written by no step")
        return deps

    def order(self) -> list[int]:
        """The steps in an order that respects the dependencies (ValueError on a cycle)."""
        deps, done, order = self.dependencies(), set(), []
        while len(order) < len(self.steps):
            ready = [i for i in range(len(self.steps)) if i not in done and deps[i] <= done]
            if not ready:
                raise ValueError(f"{self.name}: the steps' tensors form a cycle")
            order.extend(ready)
            done.update(ready)
        return order


Call = Callable[[Step, dict[str, Any]], Mapping[str, Any]]


def run_plan(
    plan: EnsemblePlan,
    inputs: Mapping[str, Any],
    call: Call,
    *,
    on_start: Callable[[Step], None] | None = None,
    on_end: Callable[[Step], None] | None = None,
) -> dict[str, Any]:
    """Run every step once, each as soon as the tensors it reads exist, independent ones in parallel threads.

    Args:
        plan: the ensemble.
        inputs: the request's tensors by ensemble input name; optional inputs the request left out are absent
            (and absent from the steps' inputs, as in Triton's ensemble).
        call: ``call(step, {model input: value})`` -> ``{model output: value}`` (at least the step's outputs).
        on_start, on_end: called (from any thread, one at a time) when a step starts and when it ends.

    Returns:
        The ensemble's outputs by name.

    Raises:
        Whatever ``call`` raised first: no further step starts, and the steps still running are not waited for
        (their threads finish on their own; their results are dropped).
    """
    tensors = dict(inputs)
    deps = plan.dependencies()
    done: set[int] = set()
    running: dict[Future, int] = {}
    lock = threading.Lock()  # on_start/on_end one at a time

    def notify(hook: Callable[[Step], None] | None, step: Step) -> None:
        if hook is not None:
            with lock:
                hook(step)

    def run(i: int, args: dict[str, Any]) -> Mapping[str, Any]:
        notify(on_start, plan.steps[i])
        return call(plan.steps[i], args)

    pool = ThreadPoolExecutor(max_workers=max(1, len(plan.steps)), thread_name_prefix=f"{plan.name}-step")
    try:
        while len(done) < len(plan.steps):
            for i, step in enumerate(plan.steps):
                if i in done or i in running.values() or not deps[i] <= done:
                    continue
                args = {key: tensors[value] for key, value in step.inputs.items() if value in tensors}
                running[pool.submit(run, i, args)] = i
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                i = running.pop(future)
                step, out = plan.steps[i], future.result()
                for key, value in step.outputs.items():
                    if key not in out:
                        raise RuntimeError(f"{step.model}: response has no output '{key}'")
                    tensors[value] = out[key]
                done.add(i)
                notify(on_end, step)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return {name: tensors[name] for name in plan.outputs}


class StreamProgress:
    """A swap's progress as a fraction in [0, 1] that never decreases.

    Each step costs :data:`isekai.constants.STREAM_STAGE_COST` (in UNet steps); the denoising step's model
    costs that plus one per denoising step. Until the loop says how many steps it runs, ``denoising_steps``
    (an estimate from the request) stands in; a changed total never makes the fraction go back.
    """

    def __init__(self, plan: EnsemblePlan, denoising_steps: int, denoise_model: str = C.DIFFUSION_MODEL,
                 costs: Mapping[str, float] = C.STREAM_STAGE_COST) -> None:
        self.costs = [float(costs.get(step.model, 1.0)) for step in plan.steps]
        self.denoise_model = denoise_model
        self.denoise_total = max(0, int(denoising_steps))
        self.denoised = 0
        self.finished: set[str] = set()
        self.plan = plan
        self._last = 0.0
        self._lock = threading.Lock()

    def _fraction(self) -> float:
        total = sum(self.costs) + self.denoise_total
        done = sum(c for c, s in zip(self.costs, self.plan.steps, strict=True) if s.model in self.finished)
        if self.denoise_model in self.finished:
            done += self.denoise_total
        else:
            done += min(self.denoised, self.denoise_total)
        value = min(1.0, done / total) if total > 0 else 1.0
        self._last = max(self._last, value)
        return self._last

    def step_done(self, model: str) -> float:
        with self._lock:
            self.finished.add(model)
            return self._fraction()

    def denoised_to(self, step: int, total: int) -> float:
        """After denoising step ``step`` of ``total`` (1-based)."""
        with self._lock:
            self.denoise_total, self.denoised = max(0, int(total)), int(step)
            return self._fraction()

    def current(self) -> float:
        with self._lock:
            return self._fraction()
