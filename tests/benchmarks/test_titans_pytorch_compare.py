"""benchmarks.titans_pytorch_compare: what runs without titans-pytorch (a project venv never has it)."""

from __future__ import annotations

import sys

import torch

import benchmarks.titans_pytorch_compare as bench


def test_skips_with_exit_status_0_without_titans_pytorch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "titans_pytorch", None)  # import now raises ImportError
    assert bench.main(bench.parse_args([])) == 0
    assert capsys.readouterr().out.startswith("SKIP: titans_pytorch is not importable")


def test_side_by_side_timing_runs_each_layer_at_its_own_thread_count(monkeypatch):
    args = bench.parse_args(["--dim", "16", "--heads", "2", "--chunk-size", "4"])
    layers = {"ours": bench.build_ours(args, "auto"), "ours-chunk": bench.build_ours(args, "chunk")}
    before = torch.get_num_threads()
    requested = []
    original = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (requested.append(n), original(n)))
    x = torch.randn(2, 10, 16, requires_grad=True)
    medians, finite = bench.time_side_by_side(layers, x, repeats=2, warmup=1, threads={"ours": 1})
    assert set(medians) == set(layers) and all(ms > 0 for ms in medians.values())
    assert finite == {"ours": (True, True), "ours-chunk": (True, True)}
    # warm-up and repeats alternate: ours at 1 thread, the other at the caller's count; then restored
    assert requested == [1, before] * 3 + [before]
    assert torch.get_num_threads() == before
