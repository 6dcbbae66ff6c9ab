"""The timing helper the benchmarks share: one synchronized call, or several candidates timed side
by side, repeat by repeat, so that a change in machine load hits every candidate alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from benchmarks.devices import synchronize

CPU = torch.device("cpu")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Timings:
    """Seconds of every timed call of one candidate, in the order they ran."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


def time_call(fn: Callable[[], Result], device: torch.device = CPU) -> tuple[float, Result]:
    """Seconds of one call of ``fn`` and what it returned. On CUDA the work queued before the call
    is finished first and the call's own work before the clock stops, so the time is the GPU's,
    not the host's time to queue it."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 0,
    device: torch.device = CPU,
    *,
    before: Callable[[str], object] | None = None,
    settle: bool = False,
) -> dict[str, Timings]:
    """Time every candidate ``repeats`` times, taking turns call by call, after ``warmup`` untimed
    rounds of the same order.

    ``before(name)`` runs untimed before every call of candidate ``name`` (to clear gradients, set
    its thread count, ...). With ``settle`` each timed call follows an untimed call of the same
    candidate, so it starts from the allocator and cache state the candidate leaves itself, not
    the state the previous candidate left (``benchmarks.memory_ops.time_side_by_side`` says when
    that matters).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    prepare = before or (lambda name: None)
    for _ in range(warmup):
        for name, fn in candidates.items():
            prepare(name)
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if settle:
                prepare(name)
                fn()
            prepare(name)
            seconds[name].append(time_call(fn, device)[0])
    return {name: Timings(times) for name, times in seconds.items()}
