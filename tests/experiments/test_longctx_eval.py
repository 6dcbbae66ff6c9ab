"""experiments/longctx_eval.py: the recipes' settings, built through the public API, and a two-length
evaluation end to end (CSV, plot, TensorBoard, skipped lengths)."""

from __future__ import annotations

import csv

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tests.conftest import REPO_ROOT

import experiments.longctx_eval as longctx_eval
from nl_lightning.models import Titans
from nl_lightning.models.layers import attention_score_bytes

RECIPES = REPO_ROOT / "recipes/longctx"


def recipe(task: str) -> dict:
    """recipes/longctx/base.yaml with tasks/<task>.yaml merged over it, key by key."""
    def merge(into: dict, other: dict) -> dict:
        for key, value in other.items():
            into[key] = merge(dict(into.get(key) or {}), value) if isinstance(value, dict) else value
        return into

    return merge(yaml.safe_load((RECIPES / "base.yaml").read_text()),
                 yaml.safe_load((RECIPES / "tasks" / f"{task}.yaml").read_text()))


@pytest.mark.parametrize("task", longctx_eval.TASKS)
def test_each_task_trains_with_its_recipes_settings(task, tmp_path):
    """What `nl-lightning fit --config base.yaml --config tasks/<task>.yaml` trains, the study trains."""
    settings = recipe(task)
    args = longctx_eval.parse_args(["--task", task, "--num-test", str(settings["data"]["init_args"]["num_test"])])
    trainer, module, data = longctx_eval.build("titans", args, tmp_path)
    for key, value in settings["data"]["init_args"].items():
        assert getattr(data, key) == value, key
    optimizer = module.optimizer_factory(module._param_groups())
    for key, value in settings["model"]["init_args"]["optimizer"]["init_args"].items():
        assert optimizer.defaults[key] == (tuple(value) if isinstance(value, list) else value), key
    assert (module.warmup_steps, module.lr_schedule) == (settings["model"]["init_args"]["warmup_steps"],
                                                         settings["model"]["init_args"]["lr_schedule"])
    assert trainer.max_steps == settings["trainer"]["max_steps"] == longctx_eval.DEFAULT_STEPS
    assert trainer.gradient_clip_val == settings["trainer"]["gradient_clip_val"]


def test_data_and_model_options_reach_the_data_module_and_the_network(tmp_path):
    args = longctx_eval.parse_args(["--data", "num_pairs=4", "--data", "eval_lengths=[64, 128]",
                                    "--override", "attn_window=16"])
    _, module, data = longctx_eval.build("titans", args, tmp_path)
    assert data.num_pairs == 4 and data.eval_lengths == [64, 128] and data.train_length == 64  # over mqar's
    assert module.network.config.attn_window == 16
    with pytest.raises(SystemExit, match="write KEY=VALUE"):
        longctx_eval.parse_args(["--data", "num_pairs"])


def test_default_evaluation_tests_the_training_length_before_the_long_ones():
    args = longctx_eval.parse_args([])
    assert args.task == "mqar" and args.lengths is None
    data = recipe(args.task)["data"]["init_args"]
    train_length = data["train_length"]
    assert longctx_eval.lengths_to_evaluate(args.lengths, train_length) == [train_length, 1024, 2048, 4096, 8192, 16384]
    assert longctx_eval.lengths_to_evaluate([512, 256, 512], train_length) == [256, 512]
    # `nl-lightning test` on the recipe tests the same lengths as the study's default run.
    assert data["eval_lengths"] == [train_length, 1024, 2048, 4096, 8192, 16384]


def test_two_length_evaluation_writes_csv_plot_and_tensorboard_and_skips_what_does_not_fit(haystack_workdir):
    out = haystack_workdir / "eval"
    # A budget between Titans-tiny's attention scores at 256 and at 512 tokens (eval batch size 1).
    titans = Titans(preset="tiny")
    budget_gb = (attention_score_bytes(titans, 256, 1) + attention_score_bytes(titans, 512, 1)) / 2 / 2**30
    small_data = ["train_length=256", "batch_size=2", "num_val=2", "eval_lengths=[256]",
                  f"haystack_paths=[{haystack_workdir / 'texts'}]", f"data_dir={haystack_workdir / 'data'}"]
    longctx_eval.main([
        "--task", "passkey", "--models", "transformer", "titans", "--lengths", "256", "512", "--steps", "1",
        "--num-test", "2", "--memory-budget-gb", str(budget_gb), "--out", str(out),
        *(arg for item in small_data for arg in ("--data", item)),
    ])
    rows = list(csv.DictReader(open(out / "passkey" / "accuracy_vs_length.csv")))
    assert [(r["model"], r["length"]) for r in rows] == [("transformer", "256"), ("transformer", "512"),
                                                          ("titans", "256"), ("titans", "512")]
    for row in rows[:3]:
        assert row["status"] == "ok" and 0.0 <= float(row["accuracy"]) <= float(row["token_accuracy"]) + 1e-9 <= 1.0 + 1e-9
    assert rows[3]["status"].startswith("skipped: sliding-window attention at 512") and rows[3]["accuracy"] == "nan"
    assert (out / "passkey" / "accuracy_vs_length.png").stat().st_size > 1000
    assert list((out / "passkey" / "transformer").glob("version_*/checkpoints/last.ckpt"))  # for --ckpt
    summary = EventAccumulator(str(out / "passkey" / "summary"))
    summary.Reload()
    assert "longctx/passkey/transformer/accuracy" in summary.Tags()["scalars"]
    assert [e.step for e in summary.Scalars("longctx/passkey/transformer/accuracy")] == [256, 512]
    assert "longctx/accuracy_vs_length" in summary.Tags()["images"]
