"""benchmarks.optimizers: the step-time table and its argument handling on the CPU, and the loss
runs built through the public API."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import benchmarks.optimizers as benchmark
import nl_lightning.optim as optim
from nl_lightning.data import ByteLMDataModule
from nl_lightning.models import Hope


def small_hope(preset):
    """A one-layer HOPE with the same parameter kinds and CMS periods as tiny."""
    return Hope(preset, overrides=dict(d_model=32, n_layer=1, n_head=2))


def test_step_time_benchmark_runs_on_cpu_and_reports_every_optimizer_against_the_faster_adamw(capsys, monkeypatch):
    # No forward+backward (HOPE's sequential memory makes one cost seconds even at this size): a smoke run.
    monkeypatch.setattr(benchmark, "Hope", small_hope)
    benchmark.main(["--part", "time", "--device", "cpu", "--steps", "2", "--fwd-bwd-every", "0"])
    out = capsys.readouterr().out
    assert "float32 params, cpu" in out and "Newton–Schulz in float32" in out and "baseline: AdamW (f" in out
    assert "forward+backward (16×256 bytes): not measured" in out
    for name in ("AdamW (foreach)", "AdamW (fused)", "Muon", "M3"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} | "))
        assert row.endswith("x | - |"), row  # the step ratio; no whole-step ratio without forward+backward


def test_step_time_benchmark_refuses_a_device_it_cannot_time_with_the_fix():
    with pytest.raises(SystemExit, match="use cpu, cuda or cuda:N"):
        benchmark.main(["--part", "time", "--device", "tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA device.*--device cpu"):
            benchmark.main(["--part", "time", "--device", "cuda"])
    with pytest.raises(SystemExit):  # argparse: exit status 2 and the usage on stderr
        benchmark.main(["--part", "time", "--steps", "0"])


def test_loss_rows_use_the_recipes_optimizer_settings():
    optimizers = benchmark.loss_optimizers(dgd_lr=0.05, dmgd_lr=0.07)
    assert list(optimizers) == ["AdamW", "Muon", "M3", "M3 (plain 1/√V)", "DGD", "DMGD"]
    adamw, _ = optimizers["AdamW"]
    assert adamw.func is optim.LevelAwareAdamW and adamw.keywords == dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert optimizers["M3"][0].keywords["normalize_update"] is True
    assert optimizers["M3 (plain 1/√V)"][0].keywords["normalize_update"] is False
    assert optimizers["DMGD"][0].keywords == dict(lr=0.07)
    dgd, callbacks = optimizers["DGD"]
    assert dgd.keywords == dict(lr=0.05) and [type(c).__name__ for c in callbacks] == ["DGDInputCapture"]


def test_loss_part_trains_and_validates_each_chosen_optimizer(capsys, monkeypatch, tmp_path, text_dir):
    monkeypatch.setattr(benchmark, "Hope", small_hope)
    # A small corpus of its own: the default one under data/ is shared with other runs.
    monkeypatch.setattr(benchmark, "ByteLMDataModule",
                        partial(ByteLMDataModule, paths=[str(text_dir)], data_dir=str(tmp_path / "data")))
    benchmark.main(["--part", "loss", "--train-steps", "2", "--val-batches", "1", "--batch-size", "2",
                    "--seq-len", "16", "--only", "AdamW", "M3"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith(("| AdamW |", "| M3 |"))]
    assert [(row[1].strip(), row[2].strip(), row[3].strip()) for row in rows] == [
        ("AdamW", "LevelAwareAdamW", "0.003"), ("M3", "M3", "0.02")]
    assert all(math.isfinite(float(row[4])) and float(row[4]) > 0 for row in rows)  # val loss in nats/byte
