"""benchmarks.zero_vs_ddp: both strategies run as 2-process jobs started with `python -m` and the
ratio is that of their medians (slow: two 2-process launches, 0.5-2 minutes on 2 cores)."""

from __future__ import annotations

import re

import pytest

import benchmarks.zero_vs_ddp as zero_vs_ddp


@pytest.mark.slow
def test_both_strategies_run_and_the_ratio_is_of_their_medians(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workers find the module through PYTHONPATH, not the working directory
    zero_vs_ddp.main(["--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "processes=2 threads/rank=1 timed steps=2 (after 1 warm-up)" in out
    ddp = float(re.search(r"DDP \(gloo\)\s+median\s+([\d.]+) ms/step", out).group(1))
    zero = float(re.search(r"ZeRO-2 \(CPUDeepSpeedStrategy\)\s+median\s+([\d.]+) ms/step", out).group(1))
    ratio = float(re.search(r"ratio ZeRO-2 / DDP \(median\): ([\d.]+)x", out).group(1))
    assert ddp > 0 and zero > 0 and ratio == pytest.approx(zero / ddp, rel=0.02)
