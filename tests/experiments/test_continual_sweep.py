"""experiments/continual_sweep.py end to end at a test's size (every protocol and method, 2 tasks, 2 seeds,
3 batches per epoch): the wiring, not the science; and the planning of each protocol."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import yaml

from experiments import continual_sweep as sweep
from tests.conftest import REPO_ROOT

SPEC = REPO_ROOT / "recipes/sweeps/continual.yaml"
REQUIRED = ("stream", "scenario", "method", "lambda", "seed", "acc", "bwt", "forgetting", "retention", "la", "steps",
            "diverged")


def _read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _outputs(tmp) -> list[str]:
    return ["--runs-csv", str(tmp / "runs.csv"), "--summary-csv", str(tmp / "summary.csv"), "--img", str(tmp / "img"),
            "--logs", str(tmp / "logs")]


@pytest.fixture(scope="module")
def mini_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "-m", "experiments.continual_sweep", *_outputs(out), "--tasks", "2", "--epochs-per-task",
           "2", "--seeds", "0", "1", "--lambdas", "1", "--workers", "2", "--set", "trainer.limit_train_batches=3"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_every_protocol_runs_every_method_with_the_required_columns(mini_sweep):
    out, _ = mini_sweep
    spec = yaml.safe_load(SPEC.read_text())
    rows = _read(out / "runs.csv")
    assert set(REQUIRED) <= set(rows[0])
    failed = {(r["protocol"], r["method"], r["lambda"]): r["status"] for r in rows if r["status"] != "ok"}
    assert not failed  # a wiring error in any protocol or method shows up here with its message
    for name, protocol in spec["protocols"].items():
        methods = protocol.get("methods", list(spec["methods"]))
        assert {r["method"] for r in rows if r["protocol"] == name} == set(methods), name
        assert all(int(r["steps"]) == 2 * 2 * 3 for r in rows if r["protocol"] == name)  # 2 tasks × 2 epochs × 3 batches
    assert {(r["stream"], r["scenario"]) for r in rows if r["protocol"] == "class"} == {("split", "class")}
    assert {(r["stream"], r["scenario"]) for r in rows if r["protocol"] == "long"} == {("permuted", "domain")}
    for row in rows:
        assert 0.0 <= float(row["acc"]) <= 1.0 and row["diverged"] == "False"
        assert len(json.loads(row["accuracy_matrix"])) == 2


def test_the_counts_show_each_level_and_bridge_and_the_scaled_periods_tick_within_a_task(mini_sweep):
    out, stdout = mini_sweep
    rows = {(r["protocol"], r["method"], r["seed"]): r for r in _read(out / "runs.csv")}
    short, scaled = (json.loads(rows[p, "collab5", "0"]["ticks"]) for p in ("short", "scaled"))
    assert short == {"UF": 12, "F": 2, "M": 0, "S": 0, "US": 0}  # periods 1/5/25/125/625 over 12 steps
    assert scaled == {"UF": 12, "F": 6, "M": 4, "S": 3, "US": 2}  # respaced to one task (6 steps): 1/2/3/4/6
    fires = json.loads(rows["scaled", "collab5", "0"]["fires"])
    assert len(fires) == 18 and min(fires.values()) >= 2  # every bridge fired (as often as its slower level)
    assert json.loads(rows["short", "cms", "0"]["ticks"])["cms.0"] == 12  # NestedScheduler's levels too
    assert "Level ticks and bridge firings:" in stdout and "| scaled | collab5 | 12 |" in stdout


def test_summary_plots_paired_verdicts_and_claims(mini_sweep):
    out, stdout = mini_sweep
    summary = _read(out / "summary.csv")
    assert {"protocol", "method", "lam", "acc", "acc_std", "retention", "retention_std", "runs", "failed"} <= set(summary[0])
    for name in ("continual_short_accuracy_vs_lambda.png", "continual_long_pareto.png"):
        pixels = plt.imread(out / "img" / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert "| scaled | collab5 − google3 (collab5 beats google3) | 1 | acc |" in stdout
    assert "Seed 000's claims vs this sweep" in stdout


def test_a_rerun_skips_finished_runs_and_from_csv_rebuilds_the_summary(mini_sweep, tmp_path):
    out, _ = mini_sweep
    again = subprocess.run([sys.executable, "-m", "experiments.continual_sweep", *_outputs(out), "--tasks", "2",
                            "--epochs-per-task", "2", "--seeds", "0", "1", "--lambdas", "1", "--workers", "1",
                            "--set", "trainer.limit_train_batches=3", "--protocols", "collapse"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 runs to go" in again.stdout
    args = [*_outputs(out)]
    args[args.index("--summary-csv") + 1] = str(tmp_path / "summary.csv")
    args[args.index("--img") + 1] = str(tmp_path / "img")
    rebuilt = subprocess.run([sys.executable, "-m", "experiments.continual_sweep", "--from-csv", *args],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert _read(tmp_path / "summary.csv") == _read(out / "summary.csv")


def _plan(**overrides):
    spec = yaml.safe_load(SPEC.read_text())
    defaults = dict(spec=SPEC, methods=None, protocols=None, seeds=None, lambdas=None, tasks=None,
                    epochs_per_task=None, set=[])
    args = SimpleNamespace(**{**defaults, **overrides})
    return sweep.plan_runs(spec, args)


def test_the_plan_gives_each_protocol_its_stream_seeds_and_nested_options():
    runs = _plan(protocols=["scaled", "collapse", "long"])
    optimizer = {(r["protocol"], r["method"], r["lam"], r["seed"]): r["config"]["model"]["init_args"]["optimizer"]
                 for r in runs}
    # scaled: the nested methods get slowest_period = one task's steps (43 batches × 2 epochs), 10 seeds each
    assert optimizer["scaled", "collab5", 5.0, 9]["init_args"]["slowest_period"] == 86
    assert "slowest_period" not in optimizer["scaled", "finetune", None, 0]["init_args"]
    assert sorted({r["seed"] for r in runs if (r["protocol"], r["method"]) == ("scaled", "google3")}) == list(range(10))
    assert sorted({r["seed"] for r in runs if (r["protocol"], r["method"]) == ("scaled", "ewc")}) == [0, 1, 2]
    # collapse: lr·λ ≥ 1, opted in for this protocol only
    assert optimizer["collapse", "google3", 50.0, 0]["init_args"]["allow_unstable_pull"] is True
    assert optimizer["long", "google3", 20.0, 0]["init_args"]["allow_unstable_pull"] is False
    long = next(r for r in runs if r["protocol"] == "long")["config"]
    assert long["trainer"]["max_epochs"] == 150 and long["data"]["init_args"]["num_tasks"] == 10
    joint = next(r for r in runs if r["method"] == "joint")["config"]
    assert joint["data"]["init_args"]["joint"] is True


def test_unknown_protocols_and_methods_name_what_the_spec_has():
    with pytest.raises(SystemExit, match="unknown methods or protocols \\['forever'\\]"):
        _plan(protocols=["forever"])


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
