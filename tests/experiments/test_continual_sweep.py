"""experiments/continual_sweep.py runs end to end (mini version: 2 tasks, 1 seed, 2 λ) and writes CSV + plots."""

from __future__ import annotations

import csv
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import yaml

from tests.conftest import REPO_ROOT

SPEC = REPO_ROOT / "recipes/sweeps/continual.yaml"


def _read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mini_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    # Every method of the spec, 2 tasks × 1 epoch, 2 batches per task: the wiring, not the science.
    cmd = [sys.executable, "-m", "experiments.continual_sweep", "--out", str(out), "--tasks", "2",
           "--epochs-per-task", "1", "--seeds", "0", "--lambdas", "1", "10", "--workers", "1",
           "--set", "trainer.limit_train_batches=2"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_mini_sweep_writes_one_row_per_run_with_the_metrics(mini_sweep):
    out, _ = mini_sweep
    methods = yaml.safe_load(SPEC.read_text())["methods"]
    rows = _read(out / "runs.csv")
    expected = sum(2 if "lambda" in entry else 1 for entry in methods.values())
    assert len(rows) == expected
    assert {r["method"] for r in rows} == set(methods)
    for column in ("method", "lam", "seed", "average_accuracy", "backward_transfer", "forgetting", "retention",
                   "learning_accuracy", "status", "accuracy_matrix", "seconds"):
        assert column in rows[0]
    failed = {(r["method"], r["lam"]): r["status"] for r in rows if r["status"] != "ok"}
    assert not failed  # a wiring error in any method shows up here with its message
    for row in rows:
        assert 0.0 <= float(row["average_accuracy"]) <= 1.0
        assert len(yaml.safe_load(row["accuracy_matrix"])) == 2  # 2 tasks → 2×2 matrix
    assert sorted(float(r["lam"]) for r in rows if r["method"] == "collab5") == [1.0, 10.0]


def test_mini_sweep_summarises_plots_and_prints_the_seed_claims(mini_sweep):
    out, stdout = mini_sweep
    summary = _read(out / "summary.csv")
    assert {"average_accuracy", "average_accuracy_std", "retention", "retention_std"} <= set(summary[0])
    for name in ("accuracy_vs_lambda.png", "pareto.png"):
        pixels = plt.imread(out / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "Seed 000's claims vs this sweep" in stdout
    assert "google3 collapses at high λ (10)" in stdout and "(1 seed: untested)" in stdout


def test_replotting_from_csv_reproduces_the_summary(mini_sweep, tmp_path):
    out, _ = mini_sweep
    result = subprocess.run([sys.executable, "-m", "experiments.continual_sweep", "--from-csv",
                             str(out / "runs.csv"), "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _read(tmp_path / "summary.csv") == _read(out / "summary.csv")
    assert (tmp_path / "pareto.png").is_file()


def test_a_method_is_its_composition_resolved_as_the_cli_stacks_it():
    from experiments.recipes import compose

    configs = ["recipes/continual/base.yaml", "recipes/continual/methods/nested.yaml",
               "recipes/continual/nested/google3.yaml"]
    optimizer = compose(configs)["model"]["init_args"]["optimizer"]
    assert optimizer["class_path"] == "nl_lightning.optim.NestedOptimizer"
    args = optimizer["init_args"]
    assert args["preset"] == "google3" and args["lr"] == 0.04  # the variant's preset on the method's lr
    assert args["inner"]["class_path"] == "nl_lightning.optim.MomentumSGD"
    assert "momentum" not in args  # SGD's momentum (the base) does not leak into the new class
    finetune = compose(["recipes/continual/base.yaml"])["model"]["init_args"]["optimizer"]
    assert finetune == {"class_path": "torch.optim.SGD", "init_args": {**finetune["init_args"], "lr": 0.04, "momentum": 0.9}}
