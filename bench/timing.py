"""Timers, medians, progress lines and result files shared by the benchmark's phases."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def say(message: str) -> None:
    """One progress line on stdout (flushed: the benchmark takes minutes, and runs under nohup)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stdout, flush=True)


def write_results(folder: Path, stem: str, result: dict, text: str) -> None:
    """``<folder>/<stem>.json`` (the raw result) and ``<stem>.md`` (its report), and the report on stdout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(text)
    print(text)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class StageTimer:
    """Seconds spent per named stage; one entry per call, so ``per_call`` medians and ``total`` sums both
    work."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.calls[stage].append(time.perf_counter() - started)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        """``fn`` timed under ``stage`` on every call."""

        def timed(*args, **kwargs):
            with self(stage):
                return fn(*args, **kwargs)

        return timed

    def per_call_ms(self) -> dict[str, float]:
        return {stage: 1e3 * statistics.median(v) for stage, v in self.calls.items() if v}

    def merge(self, other: StageTimer) -> None:
        for stage, values in other.calls.items():
            self.calls[stage].extend(values)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out
