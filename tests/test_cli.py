"""The real `nl-lightning` CLI: every recipe trains a few steps; logs and checkpoints land on disk."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nl_lightning.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
# Recipes whose folder has its own module and smoke test (run there with folder-specific overrides
# and logged tags): DeepSpeed targets GPUs (its CPU path runs with the CPU strategy in
# test_deepspeed_cpu.py); continual and long-context recipes train task streams / synthetic tasks;
# sweep specs drive benchmarks/continual_sweep.py (tests/benchmarks/test_continual_sweep.py).
OWN_SMOKE_TESTS = {"deepspeed", "continual", "longctx", "sweeps"}
TRAINABLE_HERE = [r for r in RECIPES if not OWN_SMOKE_TESTS & set(r.relative_to(REPO_ROOT / "recipes").parts)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One working directory per module, so the default corpus under data/ is built once."""
    path = tmp_path_factory.mktemp("cli")
    previous = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(previous)


def few_steps(recipe: Path, save_dir: Path, steps: int = 3) -> list[str]:
    """Overrides that turn any recipe into a short smoke run that still validates and logs."""
    args = [
        "fit", "--config", str(recipe),
        f"--trainer.max_steps={steps}", f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=2", "--trainer.val_check_interval=1.0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]
    config = yaml.safe_load(recipe.read_text())
    if config.get("data", {}).get("class_path", "").endswith("ByteLMDataModule"):
        args.append("--data.init_args.max_bytes=2000000")  # smoke runs need far less than 8 MB
    return args


def scalar_tags(log_dir: Path) -> set[str]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def single_version_dir(save_dir: Path) -> Path:
    (version,) = [p for p in save_dir.glob("*/version_*") if p.is_dir()]
    return version


def test_every_recipe_has_a_smoke_test():
    assert RECIPES, "no recipes found under recipes/"
    assert any(r.name == "transformer_tiny.yaml" for r in TRAINABLE_HERE)
    test_sources = "\n".join(path.read_text() for path in (REPO_ROOT / "tests").rglob("test_*.py"))
    for recipe in set(RECIPES) - set(TRAINABLE_HERE):
        folder = "recipes/" + recipe.relative_to(REPO_ROOT / "recipes").parts[0]
        assert folder in test_sources, f"{recipe} is skipped here but no test module names {folder!r}"


@pytest.mark.parametrize("recipe", TRAINABLE_HERE, ids=lambda p: str(p.relative_to(REPO_ROOT / "recipes")))
def test_recipe_trains_a_few_steps_and_writes_checkpoint_and_tensorboard_events(recipe, workdir):
    save_dir = workdir / f"runs-{recipe.stem}"
    main(few_steps(recipe, save_dir))
    version = single_version_dir(save_dir)
    assert (version / "checkpoints" / "last.ckpt").is_file()
    tags = scalar_tags(version)
    assert {"train/loss", "val/loss", "lr", "train/tokens_per_s", "model/params"} <= tags, tags
    assert (version / "config.yaml").is_file()


@pytest.mark.parametrize("recipe", ["hope_tiny", "titans_tiny"])
def test_memory_recipes_train_with_bf16_mixed_precision(recipe, workdir):
    # The memory kernels get mixed-dtype inputs under autocast and must run as float32 operators.
    save_dir = workdir / f"runs-bf16-{recipe}"
    small = ["--data.init_args.seq_len=64", "--data.init_args.batch_size=4"]  # bf16 matmuls are slow on CPU
    main([*few_steps(REPO_ROOT / f"recipes/lm/{recipe}.yaml", save_dir, steps=2), *small, "--trainer.precision=bf16-mixed"])
    version = single_version_dir(save_dir)
    assert (version / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(version))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")] + [e.value for e in events.Scalars("val/loss")]
    assert len(losses) >= 3 and all(math.isfinite(loss) for loss in losses), losses


def test_compile_option_from_the_command_line_trains_and_checkpoints(workdir):
    # The YAML/CLI form of LanguageModel(compile=...) reaches torch.compile; aot_eager traces
    # without generating code, so this stays quick on the CPU.
    save_dir = workdir / "runs-compile"
    recipe = REPO_ROOT / "recipes/lm/transformer_tiny.yaml"
    main([*few_steps(recipe, save_dir, steps=2), "--data.init_args.seq_len=64", "--data.init_args.batch_size=4",
          "--model.init_args.compile={backend: aot_eager}"])
    version = single_version_dir(save_dir)
    checkpoint = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["compile"] == {"backend": "aot_eager"}
    assert "network.embed.weight" in checkpoint["state_dict"]  # the eager names, no _orig_mod


def test_training_resumes_from_the_last_checkpoint(workdir):
    recipe = REPO_ROOT / "recipes/lm/transformer_tiny.yaml"
    save_dir = workdir / "runs-resume"
    main(few_steps(recipe, save_dir, steps=2))
    last = single_version_dir(save_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    main([*few_steps(recipe, save_dir, steps=4), f"--ckpt_path={last}", "--trainer.limit_train_batches=4"])
    resumed = sorted(save_dir.glob("*/version_*/checkpoints/last.ckpt"))[-1]
    assert torch.load(resumed, weights_only=False)["global_step"] == 4


def test_print_config_shows_the_resolved_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO_ROOT / "recipes/lm/transformer_tiny.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "nl_lightning.modules.LanguageModel"
    assert printed["model"]["init_args"]["network"]["init_args"]["preset"] == "tiny"
    assert printed["checkpoint"]["save_last"] is True


def test_unknown_model_class_names_it_and_the_valid_choices(tmp_path, capsys):
    recipe = yaml.safe_load((REPO_ROOT / "recipes/lm/transformer_tiny.yaml").read_text())
    recipe["model"]["init_args"]["network"]["class_path"] = "nl_lightning.models.NoSuchNet"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    assert "NoSuchNet" in message
    assert "nl_lightning.models.TransformerPP" in message and "nl_lightning.modules.LanguageModel" in message


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_subcommands_run_from_a_checkpoint(subcommand, workdir):
    recipe = REPO_ROOT / "recipes/lm/transformer_tiny.yaml"
    train_dir = workdir / "runs-for-eval"
    if not train_dir.exists():
        main(few_steps(recipe, train_dir, steps=2))
    last = next(train_dir.glob("*/version_*/checkpoints/last.ckpt"))
    eval_dir = workdir / f"runs-{subcommand}"
    main([
        subcommand, "--config", str(recipe), f"--ckpt_path={last}", "--data.init_args.max_bytes=2000000",
        "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.limit_predict_batches=2",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={eval_dir}",
    ])
    if subcommand != "predict":
        assert f"{'val' if subcommand == 'validate' else 'test'}/loss" in scalar_tags(single_version_dir(eval_dir))
