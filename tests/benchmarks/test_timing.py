"""benchmarks.timing: candidates take turns call by call, each timed call synchronized."""

from __future__ import annotations

import time

import pytest
import torch

import benchmarks.timing as timing


def recording(calls: list[str], name: str, seconds: float = 0.0):
    def fn():
        calls.append(name)
        time.sleep(seconds)
        return name
    return fn


def test_candidates_take_turns_after_the_warm_up_rounds():
    calls: list[str] = []
    candidates = {name: recording(calls, name) for name in ("a", "b", "c")}
    timings = timing.time_interleaved(candidates, repeats=3, warmup=2)
    assert calls == ["a", "b", "c"] * 5  # 2 untimed rounds, then 3 timed ones, interleaved
    assert list(timings) == ["a", "b", "c"]
    for result in timings.values():
        assert len(result.seconds) == 3 and all(s > 0 for s in result.seconds)


def test_times_are_those_of_each_candidate():
    calls: list[str] = []
    timings = timing.time_interleaved({"slow": recording(calls, "slow", 0.02), "fast": recording(calls, "fast")},
                                      repeats=3)
    slow, fast = timings["slow"], timings["fast"]
    assert all(s >= 0.02 for s in slow.seconds) and slow.best >= 0.02
    assert fast.median < 0.02 <= slow.median
    assert min(slow.seconds) == slow.best <= slow.median <= max(slow.seconds)


def test_settle_runs_each_candidate_untimed_right_before_its_timed_call():
    calls: list[str] = []
    timing.time_interleaved({name: recording(calls, name) for name in ("a", "b")}, repeats=2, warmup=1, settle=True)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2


def test_before_runs_untimed_ahead_of_every_call_of_its_candidate():
    calls: list[str] = []
    candidates = {name: recording(calls, name) for name in ("a", "b")}
    timings = timing.time_interleaved(candidates, repeats=2, warmup=1,
                                      before=lambda name: (calls.append(f"before {name}"), time.sleep(0.02)))
    assert calls == ["before a", "a", "before b", "b"] * 3
    assert all(s < 0.02 for t in timings.values() for s in t.seconds)  # the sleep in `before` is not timed


def test_every_timed_call_is_bracketed_by_synchronisation(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(timing, "synchronize", lambda device: events.append(f"sync {device}"))
    device = torch.device("cuda")  # recorded only; nothing runs on it
    timing.time_interleaved({"a": recording(events, "a"), "b": recording(events, "b")}, repeats=2, warmup=1,
                            device=device)
    # warm-up calls are not synchronised; each timed call is, before and after
    assert events == ["a", "b"] + ["sync cuda", "a", "sync cuda", "sync cuda", "b", "sync cuda"] * 2


def test_time_call_returns_the_seconds_and_the_result():
    seconds, result = timing.time_call(lambda: time.sleep(0.01) or 42)
    assert result == 42 and 0.01 <= seconds < 5


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 0), (1, -1)])
def test_refuses_counts_that_time_nothing(repeats, warmup):
    with pytest.raises(ValueError, match="repeats must be >= 1 and warmup >= 0"):
        timing.time_interleaved({"a": lambda: None}, repeats=repeats, warmup=warmup)
