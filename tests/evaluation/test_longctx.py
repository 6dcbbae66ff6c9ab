"""Long-context recipes (recipes/longctx: base + task + model) train through the CLI and test at every
length (experiments/longctx_eval.py, the accuracy-vs-length study: tests/experiments/test_longctx_eval.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
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
    ("recall", "titans", ["--model.init_args.network.init_args.overrides={attn_window: 16}"])
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


def small_data_args(haystack_workdir: Path, eval_lengths: str = "[256]") -> list[str]:
    return [
        "--data.init_args.train_length=256", "--data.init_args.batch_size=2", "--data.init_args.num_val=2",
        "--data.init_args.num_test=2", f"--data.init_args.eval_lengths={eval_lengths}",
        f"--data.init_args.haystack_paths=[{haystack_workdir / 'texts'}]", f"--data.init_args.data_dir={haystack_workdir / 'data'}",
    ]


def few_steps(task: str, model: str, haystack_workdir: Path, save_dir: Path, steps: int = 2, extra=()) -> list[str]:
    return [
        "fit", *configs(task, model), *extra,
        f"--trainer.max_steps={steps}", f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1.0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}", *small_data_args(haystack_workdir),
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
def test_longctx_composition_trains_a_few_steps_and_logs_answer_accuracy(task, model, extra, haystack_workdir):
    save_dir = haystack_workdir / f"runs-{task}-{model}"
    main(few_steps(task, model, haystack_workdir, save_dir, extra=extra))
    (version,) = save_dir.glob("*/version_*")
    assert version.parent.name == f"longctx_{task}"
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert {"train/loss", "train/token_accuracy", "val/loss", "val/accuracy", "val/token_accuracy"} <= scalar_tags(version)


def test_cli_test_from_a_checkpoint_logs_accuracy_at_every_eval_length(haystack_workdir):
    train_dir = haystack_workdir / "runs-cli-test-train"
    main(few_steps("mqar", "transformer", haystack_workdir, train_dir, steps=1))
    last = next(train_dir.glob("*/version_*/checkpoints/last.ckpt"))
    test_dir = haystack_workdir / "runs-cli-test"
    main([
        "test", *configs("mqar", "transformer"), f"--ckpt_path={last}", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={test_dir}", *small_data_args(haystack_workdir, "[256, 512]"),
    ])
    (version,) = test_dir.glob("*/version_*")
    assert {"test/accuracy@256", "test/accuracy@512", "test/token_accuracy@512", "test/loss@256"} <= scalar_tags(version)


def test_cli_test_stops_before_a_length_whose_attention_scores_exceed_the_memory_budget(haystack_workdir):
    titans = Titans(preset="tiny")
    budget_gb = (attention_score_bytes(titans, 256, 1) + attention_score_bytes(titans, 512, 1)) / 2 / 2**30
    test_dir = haystack_workdir / "runs-memory-guard"
    with pytest.raises(ValueError, match=r"attention at 512 needs ~[\d.]+ GiB of scores \([\d,]+ bytes.*eval_lengths"):
        main([
            "test", *configs("mqar", "titans"),
            f"--model.init_args.test_memory_budget_gb={budget_gb}", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={test_dir}", *small_data_args(haystack_workdir, "[256, 512]"),
        ])


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
