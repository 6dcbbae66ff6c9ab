"""Long-context recipes (recipes/longctx: base + task + model) train through the CLI; accuracy-vs-length
evaluation writes CSV, PNG, TensorBoard."""

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
RECIPES = REPO_ROOT / "recipes/longctx"
TASKS, MODELS = ("passkey", "niah", "mqar"), ("hope", "titans", "transformer")
# Every composition a user runs: the three tasks with each model, and the recall study's setting
# (tasks/recall.yaml) with Titans at its window. Each trains two steps in the default suite: ≈ 110 s
# together on 2 loaded cores, HOPE and Titans on MQAR being the slowest (≈ 25 s each).
COMPOSITIONS = [(task, model, []) for task in TASKS for model in MODELS] + [
    ("recall", "titans", ["--model.init_args.network.init_args.overrides={attn_window: 16, key_shift: true}"])
]


def configs(task: str, model: str) -> list[str]:
    """``--config`` arguments of ``task`` with ``model`` (base, task, model; later ones override)."""
    paths = [RECIPES / "base.yaml", RECIPES / "tasks" / f"{task}.yaml", RECIPES / "models" / f"{model}.yaml"]
    return [arg for path in paths for arg in ("--config", str(path))]


def merged(task: str, model: str | None = None) -> dict:
    """The YAML of the composition merged as jsonargparse merges ``--config`` files (nested keys)."""
    def merge(into: dict, other: dict) -> dict:
        for key, value in other.items():
            into[key] = merge(dict(into.get(key) or {}), value) if isinstance(value, dict) else value
        return into

    result: dict = {}
    for path in configs(task, model or "transformer")[1::2]:
        result = merge(result, yaml.safe_load(Path(path).read_text()))
    return result


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


def few_steps(task: str, model: str, workdir: Path, save_dir: Path, steps: int = 2, extra=()) -> list[str]:
    return [
        "fit", *configs(task, model), *extra,
        f"--trainer.max_steps={steps}", f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1.0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}", *small_data_args(workdir),
    ]


def scalar_tags(log_dir: Path) -> set[str]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_fragments_compose_tasks_that_train_identically_across_models():
    """A model fragment sets the network and nothing else, so every model trains a task with the
    same steps, optimizer and data; the fragments on disk are the ones the compositions name."""
    assert {p.stem for p in (RECIPES / "models").glob("*.yaml")} == set(MODELS)
    assert {p.stem for p in (RECIPES / "tasks").glob("*.yaml")} == {*TASKS, "recall"}
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == ["base.yaml"]
    for model in MODELS:
        fragment = yaml.safe_load((RECIPES / "models" / f"{model}.yaml").read_text())
        assert list(fragment) == ["model"] and list(fragment["model"]["init_args"]) == ["network"]
    for task in (*TASKS, "recall"):
        data = merged(task)["data"]["init_args"]
        assert data["task"] == ("mqar" if task == "recall" else task)


@pytest.mark.parametrize(("task", "model", "extra"), COMPOSITIONS, ids=[f"{t}-{m}" for t, m, _ in COMPOSITIONS])
def test_longctx_composition_trains_a_few_steps_and_logs_answer_accuracy(task, model, extra, workdir):
    save_dir = workdir / f"runs-{task}-{model}"
    main(few_steps(task, model, workdir, save_dir, extra=extra))
    (version,) = save_dir.glob("*/version_*")
    assert version.parent.name == f"longctx_{task}"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert {"train/loss", "train/token_accuracy", "val/loss", "val/accuracy", "val/token_accuracy"} <= scalar_tags(version)


def test_cli_test_from_a_checkpoint_logs_accuracy_at_every_eval_length(workdir):
    train_dir = workdir / "runs-cli-test-train"
    main(few_steps("mqar", "transformer", workdir, train_dir, steps=1))
    last = next(train_dir.glob("*/version_*/checkpoints/last.ckpt"))
    test_dir = workdir / "runs-cli-test"
    main([
        "test", *configs("mqar", "transformer"), f"--ckpt_path={last}", "--trainer.enable_progress_bar=false",
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
            "test", *configs("mqar", "titans"),
            f"--model.init_args.test_memory_budget_gb={budget_gb}", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={test_dir}", *small_data_args(workdir, "[256, 512]"),
        ])


def load_longctx_eval():
    return load_script(REPO_ROOT / "benchmarks/longctx_eval.py")


def test_default_evaluation_tests_the_training_length_before_the_long_ones():
    longctx_eval = load_longctx_eval()
    args = longctx_eval.parse_args([])
    assert args.task == "mqar" and args.lengths is None
    recipe = merged(args.task)
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
