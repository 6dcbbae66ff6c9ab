"""benchmarks.memory_ops: the settled timing order and an end-to-end run of a tiny table."""

from __future__ import annotations

import pytest
import torch

import benchmarks.memory_ops as memory_ops


def test_settled_timing_runs_each_impl_untimed_right_before_its_timed_call(monkeypatch):
    calls = []
    monkeypatch.setattr(memory_ops, "forward_backward", lambda fn, *args: calls.append(fn))
    monkeypatch.setattr(memory_ops, "IMPLS", {"chunk": "chunk-fn", "naive": "naive-fn"})
    memory_ops.time_side_by_side(["chunk", "naive"], None, None, "linear", 8, repeats=2)
    assert calls == ["chunk-fn", "chunk-fn", "naive-fn", "naive-fn"] * 2
    calls.clear()
    memory_ops.time_side_by_side(["chunk", "naive"], None, None, "linear", 8, repeats=2, settle=False)
    assert calls == ["chunk-fn", "naive-fn"] * 2


def test_tiny_table_runs_end_to_end(capsys):
    threads = torch.get_num_threads()
    try:
        memory_ops.main(["--lengths", "16", "--kinds", "linear", "mlp", "--dim", "8", "--chunk-size", "8",
                         "--repeats", "1", "--skip-memory"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["linear"], ["mlp"])]
    assert [row[:2] for row in rows] == [["linear", "16"], ["mlp", "16"]]
    assert all(row[-1].endswith("x") and float(row[-1][:-1]) > 0 for row in rows)


def test_triton_column_needs_a_cuda_device(capsys):
    with pytest.raises(SystemExit):
        memory_ops.main(["--triton", "--device", "cpu"])
    assert "--triton needs a CUDA device" in capsys.readouterr().err
