"""CPUDeepSpeedStrategy: DeepSpeed ZeRO 1/2/3 on 2 CPU processes (gloo, DS_ACCELERATOR=cpu) keeps
the level schedule of a LevelAwareSGD and matches one plain process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tests.conftest import changed_at, config_args, load_script

pytest.importorskip("deepspeed")

from nl_lightning.strategies import CPUDeepSpeedStrategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6  # the slow level (period 3) updates at steps 3 and 6

# Run as a script: Lightning's DeepSpeed launcher re-runs this file once per extra rank, which
# cannot work from inside pytest, so every multi-process training is a subprocess of its own.
WORKER = textwrap.dedent('''
    import sys

    import torch
    import torch.nn.functional as F
    from lightning.pytorch import Callback, LightningModule, Trainer
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from nl_lightning.callbacks import NestedScheduler
    from nl_lightning.optim import LevelAwareSGD

    GLOBAL_BATCH = 8


    def global_batch(step):
        generator = torch.Generator().manual_seed(step)
        return torch.randn(GLOBAL_BATCH, 4, generator=generator), torch.randn(GLOBAL_BATCH, 2, generator=generator)


    class Indices(Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, index):
            return index


    class TinyRegression(LightningModule):
        """Batch of step s is global_batch(s); rank r of w takes rows r::w."""

        def __init__(self, optimizer="level_aware_sgd"):
            super().__init__()
            torch.manual_seed(0)
            self.fast = nn.Linear(4, 8)
            self.slow = nn.Linear(8, 2)
            self.optimizer_name = optimizer

        def forward(self, x):
            return self.slow(torch.tanh(self.fast(x)))

        def training_step(self, batch, batch_idx):
            x, y = global_batch(self.global_step)
            rank, world = self.global_rank, self.trainer.world_size
            return F.mse_loss(self(x[rank::world]), y[rank::world])

        def train_dataloader(self):
            return DataLoader(Indices(), batch_size=1)

        def configure_optimizers(self):
            groups = [{"params": list(self.fast.parameters()), "name": "fast"},
                      {"params": list(self.slow.parameters()), "name": "slow", "period": 3}]
            if self.optimizer_name == "sgd":
                return torch.optim.SGD(groups, lr=0.1)
            return LevelAwareSGD(groups, lr=0.1)


    class Recorder(Callback):
        """Full parameters after every batch (gathered from the shards under ZeRO-3)."""

        def __init__(self):
            self.history = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            params = dict(pl_module.named_parameters())
            if any(hasattr(p, "ds_id") for p in params.values()):
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(params.values())):
                    self.history.append({n: p.detach().clone() for n, p in params.items()})
            else:
                self.history.append({n: p.detach().clone() for n, p in params.items()})


    def train(stage, devices, steps, optimizer="level_aware_sgd"):
        model, recorder = TinyRegression(optimizer), Recorder()
        options = dict(accelerator="cpu", devices=devices, max_steps=steps, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, callbacks=[NestedScheduler(), recorder])
        if stage:
            from nl_lightning.strategies import CPUDeepSpeedStrategy

            options["strategy"] = CPUDeepSpeedStrategy(stage=stage)
        trainer = Trainer(**options)
        trainer.fit(model)
        return trainer, recorder.history


    if __name__ == "__main__":
        stage, devices, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        optimizer = sys.argv[5] if len(sys.argv) > 5 else "level_aware_sgd"
        try:
            trainer, history = train(stage, devices, steps, optimizer)
        except Exception as error:  # the message is what the test checks
            with open(out + ".error", "w") as file:
                file.write(f"{type(error).__name__}: {error}")
            raise
        if trainer.is_global_zero:
            torch.save({"world_size": trainer.world_size, "history": history}, out)
''')


def worker(tmp_path: Path):
    script = tmp_path / "ds_worker.py"
    script.write_text(WORKER)
    return script, load_script(script)


def run_deepspeed(tmp_path: Path, stage: int, steps: int = STEPS, optimizer: str = "level_aware_sgd", timeout=240):
    script, _ = worker(tmp_path)
    out = tmp_path / f"zero{stage}.pt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(stage), "2", str(steps), str(out), optimizer],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, out


def check_zero_stage(tmp_path: Path, stage: int, steps: int = STEPS) -> None:
    proc, out = run_deepspeed(tmp_path, stage, steps)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    result = torch.load(out)
    assert result["world_size"] == 2
    _, module = worker(tmp_path)
    _, plain = module.train(stage=0, devices=1, steps=steps)
    got = result["history"]
    assert len(got) == len(plain) == steps
    start = dict(module.TinyRegression().named_parameters())
    expected = [s for s in range(1, steps + 1) if s % 3 == 0]
    assert changed_at(got, "slow.weight", start["slow.weight"].detach()) == expected
    assert changed_at(got, "fast.weight", start["fast.weight"].detach()) == list(range(1, steps + 1))
    for step, (g, w) in enumerate(zip(got, plain), start=1):
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=0, atol=1e-5, msg=lambda m: f"step {step} {name}: {m}")


# -- fast -------------------------------------------------------------------------------------------


def test_strategy_constructs_on_cpu_for_every_stage():
    for stage in (1, 2, 3):
        strategy = CPUDeepSpeedStrategy(stage=stage)
        assert strategy.config["zero_optimization"]["stage"] == stage
        assert strategy._process_group_backend == "gloo"
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_trainer_accepts_the_strategy_on_cpu():
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=2), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, CPUDeepSpeedStrategy)
    assert trainer.strategy.root_device.type == "cpu" and trainer.world_size == 2


# About 12 s each on 2 cores (a Python start per rank + DeepSpeed's setup), so not marked slow.
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_on_two_cpu_processes_keeps_the_level_schedule_and_matches_plain_training(tmp_path, stage):
    check_zero_stage(tmp_path, stage)


def deepspeed_composition(stage: int) -> list[str]:
    """The ``--config`` arguments of README's DeepSpeed recipe at ``stage``."""
    lm = ROOT / "recipes" / "lm"
    configs = [lm / "base.yaml", lm / "models/hope.yaml", lm / "optim/level_aware_adamw.yaml",
               lm / "schedules/cms.yaml", ROOT / "recipes" / "deepspeed" / f"zero{stage}.yaml"]
    return config_args(configs)


# GPU recipes under recipes/deepspeed (tests/test_cli.py leaves them to this module): fragments
# stacked on HOPE with its CMS timescales; at least check that the composition resolves to the
# stage, model, optimizer and scheduler the fragment's comment promises.
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_recipe_composes_onto_hope_with_its_cms_timescales(stage, capsys):
    from nl_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *deepspeed_composition(stage), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["trainer"]["strategy"]["init_args"]["stage"] == stage
    assert resolved["model"]["init_args"]["network"]["class_path"] == "nl_lightning.models.Hope"
    assert resolved["model"]["init_args"]["optimizer"]["class_path"] == "nl_lightning.optim.LevelAwareAdamW"
    assert [c["class_path"] for c in resolved["trainer"]["callbacks"]] == ["nl_lightning.callbacks.NestedScheduler"]


# -- slow -------------------------------------------------------------------------------------------


@pytest.mark.slow  # another 2-process DeepSpeed start, ~10 s
def test_nested_scheduler_with_a_plain_optimizer_under_deepspeed_raises_a_clear_error(tmp_path):
    proc, out = run_deepspeed(tmp_path, stage=2, steps=2, optimizer="sgd")
    assert proc.returncode != 0
    message = Path(str(out) + ".error").read_text()
    assert "under DeepSpeed the engine owns the optimizer step" in message and "LevelAwareAdamW" in message


@pytest.mark.slow  # two DeepSpeed processes training HOPE-tiny: about a minute on 2 cores
def test_deepspeed_recipe_trains_on_two_cpu_processes_with_the_readme_overrides(tmp_path):
    """README's CPU form of the ZeRO-2 recipe: the composition trains, the CMS levels keep their
    schedule (NestedScheduler logs every level) and the run leaves a checkpoint."""
    command = [
        sys.executable, "-m", "nl_lightning.cli", "fit", *deepspeed_composition(2),
        "--trainer.strategy.class_path=nl_lightning.strategies.CPUDeepSpeedStrategy",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32", "--trainer.max_steps=10",
        "--trainer.val_check_interval=10", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--data.init_args.seq_len=64", "--data.init_args.batch_size=2", "--data.init_args.max_bytes=300000",
        f"--data.init_args.data_dir={tmp_path / 'data'}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (version,) = (tmp_path / "runs" / "deepspeed_zero2").glob("version_*")
    assert (version / "checkpoints" / "last.ckpt").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # NestedScheduler logs every 10 steps (the fragment's log_every_n_steps): once, at step 10
    assert {"train/loss", "val/loss", "nested/cms.2/updates"} <= tags, sorted(tags)
    assert events.Scalars("nested/cms.2/updates")[-1].value == 0.0  # period 16: not due yet at step 10
    assert events.Scalars("nested/cms.1/updates")[-1].value == 2.0  # period 4: steps 4 and 8


@pytest.mark.slow  # two DeepSpeed starts in this process: 30-100 s
def test_deepspeed_checkpoints_are_swapped_in_whole_and_resume(tmp_path):
    """One CPU process, ZeRO-2: last.ckpt is a DeepSpeed directory written through a staging
    directory (nothing of it is left), and training resumes from it."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, module = worker(tmp_path)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    options = dict(accelerator="cpu", devices=1, precision=32, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[checkpoint])
    Trainer(max_steps=2, strategy=CPUDeepSpeedStrategy(stage=2), **options).fit(module.TinyRegression())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_dir() and any(last.rglob("*.pt"))
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]
    resumed = Trainer(max_steps=4, strategy=CPUDeepSpeedStrategy(stage=2), **options)
    resumed.fit(module.TinyRegression(), ckpt_path=str(last))
    assert resumed.global_step == 4
