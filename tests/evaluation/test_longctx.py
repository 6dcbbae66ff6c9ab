"""Long-context recipes (recipes/longctx) train through the CLI; accuracy-vs-length evaluation writes CSV, PNG, TensorBoard."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml
from tests.conftest import load_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nl_lightning.cli import main
from nl_lightning.models.layers import attention_score_bytes
from nl_lightning.models import Titans, TransformerPP

REPO_ROOT = Path(__file__).resolve().parents[2]
LONGCTX_RECIPES = sorted((REPO_ROOT / "recipes/longctx").glob("*.yaml"))
# Every recipe (3 tasks × 3 networks) trains two steps in the default suite: ≈ 100 s together on
# 2 loaded cores, HOPE and Titans on MQAR being the slowest (≈ 25 s each).
SMOKE_RECIPES = [pytest.param(r, id=r.stem) for r in LONGCTX_RECIPES]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A module-wide working directory with a small haystack corpus, so NIAH never builds the stdlib one."""
    path = tmp_path_factory.mktemp("longctx")
    texts = path / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"file_{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x + {j}\n" for j in range(300)))
    previous = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(previous)


def small_data_args(workdir: Path, eval_lengths: str = "[256]") -> list[str]:
    return [
        "--data.init_args.train_length=256", "--data.init_args.batch_size=2", "--data.init_args.num_val=2",
        "--data.init_args.num_test=2", f"--data.init_args.eval_lengths={eval_lengths}",
        f"--data.init_args.haystack_paths=[{workdir / 'texts'}]", f"--data.init_args.data_dir={workdir / 'data'}",
    ]


def few_steps(recipe: Path, workdir: Path, save_dir: Path, steps: int = 2) -> list[str]:
    return [
        "fit", "--config", str(recipe),
        f"--trainer.max_steps={steps}", f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1.0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}", *small_data_args(workdir),
    ]


def scalar_tags(log_dir: Path) -> set[str]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_all_nine_recipes_exist_and_train_each_task_identically_across_models():
    names = {r.stem for r in LONGCTX_RECIPES}
    assert names == {f"{m}_{t}_tiny" for m in ("hope", "titans", "transformer") for t in ("mqar", "niah", "passkey")} | {
        "titans_recall_tiny"  # the recall study's training setting (experiments/recall.py)
    }
    for task in ("mqar", "niah", "passkey"):
        configs = [yaml.safe_load((REPO_ROOT / f"recipes/longctx/{m}_{task}_tiny.yaml").read_text())
                   for m in ("hope", "titans", "transformer")]
        for config in configs:
            config["model"]["init_args"].pop("network")
            config["trainer"].pop("logger")
        assert configs[0] == configs[1] == configs[2], f"{task}: steps, optimizer or data differ between models"


@pytest.mark.parametrize("recipe", SMOKE_RECIPES)
def test_longctx_recipe_trains_a_few_steps_and_logs_answer_accuracy(recipe, workdir):
    save_dir = workdir / f"runs-{recipe.stem}"
    main(few_steps(recipe, workdir, save_dir))
    (version,) = save_dir.glob("*/version_*")
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert {"train/loss", "train/token_accuracy", "val/loss", "val/accuracy", "val/token_accuracy"} <= scalar_tags(version)


def test_cli_test_from_a_checkpoint_logs_accuracy_at_every_eval_length(workdir):
    recipe = REPO_ROOT / "recipes/longctx/transformer_mqar_tiny.yaml"
    train_dir = workdir / "runs-cli-test-train"
    main(few_steps(recipe, workdir, train_dir, steps=1))
    last = next(train_dir.glob("*/version_*/checkpoints/last.ckpt"))
    test_dir = workdir / "runs-cli-test"
    main([
        "test", "--config", str(recipe), f"--ckpt_path={last}", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={test_dir}", *small_data_args(workdir, "[256, 512]"),
    ])
    (version,) = test_dir.glob("*/version_*")
    assert {"test/accuracy@256", "test/accuracy@512", "test/token_accuracy@512", "test/loss@256"} <= scalar_tags(version)


def test_cli_test_stops_before_a_length_whose_attention_scores_exceed_the_memory_budget(workdir):
    titans = Titans(preset="tiny")
    budget_gb = (attention_score_bytes(titans, 256, 1) + attention_score_bytes(titans, 512, 1)) / 2 / 2**30
    test_dir = workdir / "runs-memory-guard"
    with pytest.raises(ValueError, match=r"attention at 512 needs ~[\d.]+ GiB of scores \([\d,]+ bytes.*eval_lengths"):
        main([
            "test", "--config", str(REPO_ROOT / "recipes/longctx/titans_mqar_tiny.yaml"),
            f"--model.init_args.test_memory_budget_gb={budget_gb}", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={test_dir}", *small_data_args(workdir, "[256, 512]"),
        ])


def load_longctx_eval():
    return load_script(REPO_ROOT / "benchmarks/longctx_eval.py")


def test_default_evaluation_tests_the_training_length_before_the_long_ones():
    longctx_eval = load_longctx_eval()
    args = longctx_eval.parse_args([])
    assert args.task == "mqar" and args.lengths is None
    recipe = yaml.safe_load((REPO_ROOT / f"recipes/longctx/transformer_{args.task}_tiny.yaml").read_text())
    train_length = recipe["data"]["init_args"]["train_length"]
    assert longctx_eval.lengths_to_evaluate(args.lengths, train_length) == [train_length, 1024, 2048, 4096, 8192, 16384]
    assert longctx_eval.lengths_to_evaluate([512, 256, 512], train_length) == [256, 512]
    # `nl-lightning fit`/`test` on the recipe train as long and test the same lengths as the script's default run.
    assert recipe["data"]["init_args"]["eval_lengths"] == [train_length, 1024, 2048, 4096, 8192, 16384]
    assert recipe["trainer"]["max_steps"] == args.steps


def test_two_length_evaluation_writes_csv_plot_and_tensorboard_and_skips_what_does_not_fit(workdir):
    longctx_eval = load_longctx_eval()
    out = workdir / "eval"
    # A budget between Titans-tiny's attention scores at 256 and at 512 tokens (eval batch size 1).
    titans = Titans(preset="tiny")
    budget_gb = (attention_score_bytes(titans, 256, 1) + attention_score_bytes(titans, 512, 1)) / 2 / 2**30
    longctx_eval.main([
        "--task", "passkey", "--models", "transformer", "titans", "--lengths", "256", "512", "--steps", "1",
        "--num-test", "2", "--memory-budget-gb", str(budget_gb), "--out", str(out),
        *(f"--override={arg}" for arg in small_data_args(workdir)),
    ])
    rows = list(csv.DictReader(open(out / "passkey" / "accuracy_vs_length.csv")))
    assert [(r["model"], r["length"]) for r in rows] == [("transformer", "256"), ("transformer", "512"),
                                                          ("titans", "256"), ("titans", "512")]
    for row in rows[:3]:
        assert row["status"] == "ok" and 0.0 <= float(row["accuracy"]) <= float(row["token_accuracy"]) + 1e-9 <= 1.0 + 1e-9
    assert rows[3]["status"].startswith("skipped: sliding-window attention at 512") and rows[3]["accuracy"] == "nan"
    assert (out / "passkey" / "accuracy_vs_length.png").stat().st_size > 1000
    summary = EventAccumulator(str(out / "passkey" / "summary"))
    summary.Reload()
    assert "longctx/passkey/transformer/accuracy" in summary.Tags()["scalars"]
    assert [e.step for e in summary.Scalars("longctx/passkey/transformer/accuracy")] == [256, 512]
    assert "longctx/accuracy_vs_length" in summary.Tags()["images"]


def test_attention_score_estimate_is_linear_in_length_once_sliding_windows_go_blocked():
    titans, transformer = Titans(preset="tiny"), TransformerPP(preset="tiny")
    window = titans.config.attn_window
    assert attention_score_bytes(transformer, 16384, 1) == 0  # full causal attention: fused kernel
    assert attention_score_bytes(titans, window, 1) == 0  # the window covers the sequence: causal path
    # up to two windows the dense (T, T) mask; beyond, 2·window scores per query
    heads = titans.config.n_head
    assert attention_score_bytes(titans, 2 * window, 1) == heads * (2 * window) ** 2 * 8 + (2 * window) ** 2
    assert attention_score_bytes(titans, 4096, 1) == 2 * attention_score_bytes(titans, 2048, 1) > 0
    assert attention_score_bytes(titans, 16384, 1) < 2**30 // 8  # 16K fits a laptop: ~0.06 GiB
