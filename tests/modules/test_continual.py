"""ContinualClassifier: the accuracy matrix, task-incremental masking, resuming, bad configurations."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from nl_lightning.callbacks import EWC, ExperienceReplay, SynapticIntelligence
from nl_lightning.data.continual import ContinualDataModule
from nl_lightning.modules import ContinualClassifier
from nl_lightning.optim import MomentumSGD, NestedOptimizer

TRAIN_BATCHES, VAL_BATCHES, BATCH = 4, 2, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only spin and wait


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class RecordMatrix(Callback):
    """R after every validation, as the checkpoint written at that validation's end would see it."""

    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.snapshots.append(pl_module.accuracy_matrix.clone())


def fit(tmp_path: Path, callbacks=(), stream="permuted", scenario=None, max_epochs=2, ckpt_path=None,
        optimizer=sgd, checkpoint: ModelCheckpoint | None = None, **trainer_args):
    seed_everything(0)
    data = ContinualDataModule(stream=stream, scenario=scenario, num_tasks=2, epochs_per_task=1, batch_size=BATCH)
    model = ContinualClassifier(arch="mlp", hidden=32, optimizer=optimizer)
    settings = dict(
        max_epochs=max_epochs, reload_dataloaders_every_n_epochs=1, limit_train_batches=TRAIN_BATCHES,
        limit_val_batches=VAL_BATCHES, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=checkpoint is not None, default_root_dir=tmp_path,
        callbacks=[*callbacks, *([checkpoint] if checkpoint else [])],
    )
    trainer = Trainer(**{**settings, **trainer_args})
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, data, trainer


def accuracy_by_hand(model: ContinualClassifier, data: ContinualDataModule, task: int) -> float:
    """Accuracy on the examples validation saw (the first VAL_BATCHES batches), masked like the module."""
    x, y = data.stream.tasks[task].test.tensors
    seen = VAL_BATCHES * data.hparams.get("eval_batch_size", BATCH)
    x, y = x[:seen], y[:seen]
    with torch.no_grad():
        logits = model(x)
        if data.stream.scenario == "task":
            outside = torch.ones(logits.shape[1], dtype=torch.bool)
            outside[list(data.stream.tasks[task].classes)] = False
            logits[:, outside] = float("-inf")
    return (logits.argmax(-1) == y).float().mean().item()


def test_accuracy_matrix_fills_row_by_row_with_the_accuracy_on_every_task(tmp_path):
    record = RecordMatrix()
    model, data, _ = fit(tmp_path, callbacks=[record])
    after_task0, after_task1 = record.snapshots
    assert torch.isfinite(after_task0[0]).all() and torch.isnan(after_task0[1]).all()
    assert torch.isfinite(after_task1).all() and torch.equal(after_task1[0], after_task0[0])
    for j in range(2):  # row 1 was measured with the final weights
        assert model.accuracy_matrix[1, j].item() == pytest.approx(accuracy_by_hand(model, data, j), abs=1e-6)


def test_joint_training_masks_each_example_by_its_own_task(tmp_path):
    """The joint upper bound of a task-incremental stream: one batch mixes tasks, and each example's
    logits are masked to its own task's classes (the ids the batch carries, not the epoch's task)."""
    seed_everything(0)
    data = ContinualDataModule(stream="split", scenario="task", num_tasks=2, epochs_per_task=1, batch_size=BATCH,
                               joint=True)
    model = ContinualClassifier(arch="mlp", hidden=32, optimizer=sgd)
    seen = []
    original = model.mask_logits
    model.mask_logits = lambda logits, task_ids: (seen.append(task_ids.clone()), original(logits, task_ids))[1]
    trainer = Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, limit_train_batches=TRAIN_BATCHES,
                      limit_val_batches=VAL_BATCHES, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    train_ids = torch.cat(seen[: TRAIN_BATCHES])  # the first epoch's training batches
    assert set(train_ids.tolist()) == {0, 1}
    assert torch.isfinite(model.accuracy_matrix).all()


def test_task_incremental_streams_mask_logits_to_each_examples_task(tmp_path):
    model, data, _ = fit(tmp_path, stream="split", scenario="task")
    classes = [set(task.classes) for task in data.stream.tasks]
    assert classes == [{0, 1, 2, 3, 4}, {5, 6, 7, 8, 9}]
    logits = model.mask_logits(torch.randn(4, 10), torch.tensor([0, 1, 0, 1]))
    for row, task in zip(logits.argmax(-1).tolist(), [0, 1, 0, 1]):
        assert row in classes[task]
    for j in range(2):
        assert model.accuracy_matrix[1, j].item() == pytest.approx(accuracy_by_hand(model, data, j), abs=1e-6)
    model.scenario = "class"  # class-incremental: the model must tell all classes apart, no mask
    unmasked = torch.randn(2, 10)
    assert torch.equal(model.mask_logits(unmasked, torch.tensor([0, 1])), unmasked)


def strategies():
    return [EWC(strength=10.0), SynapticIntelligence(strength=1.0), ExperienceReplay(buffer_size=50, seed=1)]


class CaptureAtTrainStart(Callback):
    """What a resumed run starts from: R, the weights and every strategy's state_dict, after restoring."""

    def __init__(self, strategies) -> None:
        self.strategies, self.captured = strategies, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.captured = {
            "R": pl_module.accuracy_matrix.clone(),
            "weights": [p.detach().clone() for p in pl_module.parameters()],
            "states": [copy.deepcopy(strategy.state_dict()) for strategy in self.strategies],
        }


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b.to(a.device), rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for n, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{n}]")
    else:
        assert a == b, where


def test_resuming_from_a_task_boundary_restores_the_matrix_weights_and_strategy_states(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_strategies = strategies()
    first, _, _ = fit(tmp_path / "first", callbacks=first_strategies, max_epochs=1, checkpoint=checkpoint)
    assert first_strategies[1].path_integral and first_strategies[2].buffer.seen == TRAIN_BATCHES * BATCH

    resumed_strategies = strategies()
    capture = CaptureAtTrainStart(resumed_strategies)
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed, _, _ = fit(tmp_path / "resumed", callbacks=[*resumed_strategies, capture], ckpt_path=str(last))

    assert_same(first.accuracy_matrix, capture.captured["R"], "R")
    assert_same([p.detach() for p in first.parameters()], capture.captured["weights"], "weights")
    for strategy, state in zip(first_strategies, capture.captured["states"]):
        assert_same(strategy.state_dict(), state, type(strategy).__name__)
    # …and the resumed run carries on: task 1's row, EWC's Fisher of task 0, SI's importance.
    assert torch.isfinite(resumed.accuracy_matrix).all()
    assert len(resumed_strategies[0].fishers) == 1 and resumed_strategies[1].importance

    saved = ContinualClassifier.load_from_checkpoint(last)  # the network is rebuilt from the checkpoint
    assert_same(first.accuracy_matrix, saved.accuracy_matrix, "R after load_from_checkpoint")


def test_nested_optimizer_runs_under_lightnings_closure_step(tmp_path):
    def nested(params):
        return NestedOptimizer(params, lr=0.05, preset="google3", levels=[1, 2, 4], inner=MomentumSGD(0.9))

    model, _, trainer = fit(tmp_path, optimizer=nested)
    optimizer = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])  # under LightningOptimizer
    assert isinstance(optimizer, NestedOptimizer)
    stats = optimizer.level_stats()
    assert stats["level/F/ticks"] == 2 * TRAIN_BATCHES and stats["level/S/ticks"] == 2 * TRAIN_BATCHES // 4
    assert torch.isfinite(model.accuracy_matrix).all()


@pytest.mark.parametrize(
    "trainer_args, message",
    [
        ({"reload_dataloaders_every_n_epochs": 0}, "reload_dataloaders_every_n_epochs"),
        ({"max_epochs": 3}, "max_epochs to 2"),
        ({"check_val_every_n_epoch": 2}, "check_val_every_n_epoch"),
    ],
)
def test_trainer_settings_that_would_skip_tasks_or_rows_fail_with_the_fix(tmp_path, trainer_args, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        fit(tmp_path, **trainer_args)


def test_network_with_the_wrong_number_of_classes_names_the_fix(tmp_path):
    data = ContinualDataModule(stream="permuted", num_tasks=2)
    model = ContinualClassifier(network=nn.Sequential(nn.Flatten(), nn.Linear(64, 7)))
    trainer = Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="num_classes=10"):
        trainer.fit(model, data)
