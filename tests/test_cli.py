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
from tests.conftest import config_args

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
# Recipes whose folder has its own module and smoke test (run there with folder-specific overrides
# and logged tags): DeepSpeed targets GPUs (its CPU path runs with the CPU strategy in
# test_deepspeed_cpu.py); continual and long-context recipes train task streams / synthetic tasks;
# sweep specs drive experiments/continual_sweep.py (tests/experiments/test_continual_sweep.py).
# recipes/lm is composed (base + model + optimizer or schedule) and tested here, composition by
# composition.
OWN_SMOKE_TESTS = {"deepspeed", "continual", "longctx", "sweeps"}
LM = REPO_ROOT / "recipes/lm"
# Every language-modelling composition README lists: base.yaml, then these fragments.
LM_COMPOSITIONS = {
    "transformer": ["models/transformer.yaml"],
    "titans": ["models/titans.yaml"],
    "hope": ["models/hope.yaml"],
    "hope+cms": ["models/hope.yaml", "schedules/cms.yaml"],
    "hope+cms+in_context": ["models/hope.yaml", "schedules/cms.yaml", "schedules/cms_in_context.yaml"],
    "transformer+google3": ["models/transformer.yaml", "optim/google3.yaml"],
    "transformer+collab5": ["models/transformer.yaml", "optim/collab5.yaml"],
    **{f"hope+{optimizer}": ["models/hope.yaml", f"optim/{optimizer}.yaml"]
       for optimizer in ("level_aware_adamw", "muon", "m3", "dmgd")},
}


def lm_recipe(name: str) -> list[Path]:
    """The config files of the composition ``name`` of LM_COMPOSITIONS, in stacking order."""
    return [LM / "base.yaml", *(LM / fragment for fragment in LM_COMPOSITIONS[name])]


TRANSFORMER = lm_recipe("transformer")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One working directory per module, so the default corpus under data/ is built once."""
    path = tmp_path_factory.mktemp("cli")
    previous = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(previous)


def few_steps(recipe: list[Path], save_dir: Path, steps: int = 3) -> list[str]:
    """Overrides that turn any recipe into a short smoke run that still validates and logs."""
    args = [
        "fit", *config_args(recipe),
        f"--trainer.max_steps={steps}", f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=2", "--trainer.val_check_interval=1.0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]
    configs = [yaml.safe_load(path.read_text()) for path in recipe]
    if any(c.get("data", {}).get("class_path", "").endswith("ByteLMDataModule") for c in configs):
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
    # every file under recipes/lm is in a composition run below, and README lists every composition
    composed = {LM / "base.yaml"} | {LM / f for fragments in LM_COMPOSITIONS.values() for f in fragments}
    assert set(LM.rglob("*.yaml")) == composed, set(LM.rglob("*.yaml")) ^ composed
    readme = (REPO_ROOT / "README.md").read_text()
    for fragment in composed:
        assert str(fragment.relative_to(REPO_ROOT)) in readme, f"README does not list {fragment}"
    test_sources = "\n".join(path.read_text() for path in (REPO_ROOT / "tests").rglob("test_*.py"))
    others = [r for r in RECIPES if r.relative_to(REPO_ROOT / "recipes").parts[0] != "lm"]
    for recipe in others:
        folder = "recipes/" + recipe.relative_to(REPO_ROOT / "recipes").parts[0]
        assert folder.removeprefix("recipes/") in OWN_SMOKE_TESTS, f"{recipe}: no smoke test runs {folder}"
        assert folder in test_sources, f"{recipe} is skipped here but no test module names {folder!r}"


@pytest.mark.parametrize("name", LM_COMPOSITIONS)
def test_recipe_trains_a_few_steps_and_writes_checkpoint_and_tensorboard_events(name, workdir):
    save_dir = workdir / f"runs-{name}"
    scheduled = "schedules/cms.yaml" in LM_COMPOSITIONS[name]
    args = few_steps(lm_recipe(name), save_dir, steps=10 if scheduled else 3)
    if scheduled:  # it logs its levels every 10 steps (the recipe's log_every_n_steps): run that long, small
        args += ["--data.init_args.batch_size=4", "--data.init_args.seq_len=64"]
    main(args)
    version = single_version_dir(save_dir)
    assert (version / "checkpoints" / "last.ckpt").is_file()
    tags = scalar_tags(version)
    assert {"train/loss", "val/loss", "lr", "train/tokens_per_s", "model/params"} <= tags, tags
    assert (version / "config.yaml").is_file()
    if scheduled:  # the scheduler logs every CMS level's updates
        levels = 4 if "schedules/cms_in_context.yaml" in LM_COMPOSITIONS[name] else 3
        assert {f"nested/cms.{level}/updates" for level in range(levels)} <= tags, tags


def test_make_fit_trains_hope_with_its_cms_schedule():
    makefile = (REPO_ROOT / "Makefile").read_text()
    (line,) = [line for line in makefile.splitlines() if line.startswith("RECIPE")]
    assert [REPO_ROOT / path for path in line.partition("?=")[2].split()] == lm_recipe("hope+cms")


@pytest.mark.parametrize("recipe", ["hope", "titans"])
def test_memory_recipes_train_with_bf16_mixed_precision(recipe, workdir):
    # The memory kernels get mixed-dtype inputs under autocast and must run as float32 operators.
    save_dir = workdir / f"runs-bf16-{recipe}"
    small = ["--data.init_args.seq_len=64", "--data.init_args.batch_size=4"]  # bf16 matmuls are slow on CPU
    main([*few_steps(lm_recipe(recipe), save_dir, steps=2), *small, "--trainer.precision=bf16-mixed"])
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
    recipe = TRANSFORMER
    main([*few_steps(recipe, save_dir, steps=2), "--data.init_args.seq_len=64", "--data.init_args.batch_size=4",
          "--model.init_args.compile={backend: aot_eager}"])
    version = single_version_dir(save_dir)
    checkpoint = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["compile"] == {"backend": "aot_eager"}
    assert "network.embed.weight" in checkpoint["state_dict"]  # the eager names, no _orig_mod


def test_training_resumes_from_the_last_checkpoint(workdir):
    recipe = TRANSFORMER
    save_dir = workdir / "runs-resume"
    main(few_steps(recipe, save_dir, steps=2))
    last = single_version_dir(save_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    main([*few_steps(recipe, save_dir, steps=4), f"--ckpt_path={last}", "--trainer.limit_train_batches=4"])
    resumed = sorted(save_dir.glob("*/version_*/checkpoints/last.ckpt"))[-1]
    assert torch.load(resumed, weights_only=False)["global_step"] == 4


def test_print_config_shows_the_resolved_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(TRANSFORMER), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "nl_lightning.modules.LanguageModel"
    assert printed["model"]["init_args"]["network"]["init_args"]["preset"] == "tiny"
    assert printed["checkpoint"]["save_last"] is True


def test_unknown_model_class_names_it_and_the_valid_choices(tmp_path, capsys):
    fragment = yaml.safe_load((LM / "models/transformer.yaml").read_text())
    fragment["model"]["init_args"]["network"]["class_path"] = "nl_lightning.models.NoSuchNet"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(fragment))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args([LM / "base.yaml", bad])])
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    assert "NoSuchNet" in message
    assert "nl_lightning.models.TransformerPP" in message and "nl_lightning.modules.LanguageModel" in message


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_subcommands_run_from_a_checkpoint(subcommand, workdir):
    recipe = TRANSFORMER
    train_dir = workdir / "runs-for-eval"
    if not train_dir.exists():
        main(few_steps(recipe, train_dir, steps=2))
    last = next(train_dir.glob("*/version_*/checkpoints/last.ckpt"))
    eval_dir = workdir / f"runs-{subcommand}"
    main([
        subcommand, *config_args(recipe), f"--ckpt_path={last}", "--data.init_args.max_bytes=2000000",
        "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--trainer.limit_predict_batches=2",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={eval_dir}",
    ])
    if subcommand != "predict":
        assert f"{'val' if subcommand == 'validate' else 'test'}/loss" in scalar_tags(single_version_dir(eval_dir))
