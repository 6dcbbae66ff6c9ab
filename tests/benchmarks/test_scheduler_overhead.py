"""benchmarks.scheduler_overhead: both arms train side by side and the table reports them."""

from __future__ import annotations

import re

import torch

import benchmarks.scheduler_overhead as scheduler_overhead


def test_tiny_pair_reports_both_arms_and_their_ratio(capsys):
    threads = torch.get_num_threads()
    try:
        scheduler_overhead.main(["--model", "transformer", "--steps", "4", "--warmup", "1", "--repeats", "1",
                                 "--batch-size", "1", "--seq-len", "16", "--log-every", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets its own thread count
    out = capsys.readouterr().out
    assert "3 timed steps per arm" in out  # 4 steps, the first untimed
    without = float(re.search(r"median step without NestedScheduler:\s+([\d.]+) ms", out).group(1))
    with_ = float(re.search(r"median step with NestedScheduler:\s+([\d.]+) ms", out).group(1))
    ratio = float(re.search(r"ratio with / without:\s+([\d.]+)", out).group(1))
    assert without > 0 and with_ > 0 and abs(ratio - with_ / without) < 0.05 * ratio  # from the rounded medians
