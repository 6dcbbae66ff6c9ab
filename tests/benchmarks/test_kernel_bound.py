"""The kernel-bound benchmark records the heavy kernel calls of a step and can replay each one."""

from __future__ import annotations

import math
import time

import torch
from tests.conftest import REPO_ROOT

import benchmarks.kernel_bound as kernel_bound


def test_records_heavy_calls_by_layout_and_skips_elementwise():
    a, b = torch.randn(8, 4), torch.randn(4, 5)
    batched = torch.randn(3, 8, 4)
    with kernel_bound.RecordHeavyCalls() as recorder:
        a @ b
        a @ b
        a.mT.contiguous().mT @ b  # same shape, other strides: a separate entry
        batched @ b.expand(3, 4, 5)
        (a * 2).exp()
    calls = {(func.overloadpacket.__name__, count) for (func, _, _), count in recorder.calls.items()}
    assert sorted(calls) == [("bmm", 1), ("mm", 1), ("mm", 2)]
    assert recorder.all_calls > 4  # the elementwise ops (and the copy) are counted there


def test_tensor_spec_rebuilds_broadcast_layouts():
    expanded = torch.randn(4, 1, 6).expand(4, 5, 6)
    rebuilt = kernel_bound.TensorSpec.of(expanded).make()
    assert rebuilt.shape == expanded.shape and rebuilt.stride() == expanded.stride()
    assert torch.isfinite(rebuilt).all()


def test_replays_a_recorded_triangular_solve():
    system = torch.eye(16) + 0.1 * torch.randn(16, 16).tril(-1)
    with kernel_bound.RecordHeavyCalls() as recorder:
        torch.linalg.solve_triangular(system, torch.randn(16, 3), upper=False, unitriangular=True)
    ((func, args, kwargs), count), = recorder.calls.items()
    assert count == 1 and func.overloadpacket is torch.ops.aten.linalg_solve_triangular
    started = time.perf_counter()
    seconds = kernel_bound.time_kernel(func, args, kwargs, min_seconds=1e-4, repeats=2)
    # per call: a warm-up, the batch sizing (>= 1e-4 s) and two timed batches of the same calls fit
    # in the wall time at least three times over
    assert math.isfinite(seconds) and 0 < 3 * seconds <= time.perf_counter() - started


def test_end_to_end_table(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    kernel_bound.main(["transformer", "--steps", "1", "--warmup", "0", "--seq-len", "32", "--batch-size", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| transformer |")]
    assert len(rows) == 1
    step, bound, calls, all_calls = (float(cell) for cell in rows[0].split("|")[2:6])
    assert step > 0 and bound > 0 and 0 < calls < all_calls
