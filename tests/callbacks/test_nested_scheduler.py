"""NestedScheduler in real Trainers: level schedule, optimizer state, resume, accumulation, DDP, logging, config errors."""

from __future__ import annotations

import io
import multiprocessing
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nl_lightning.callbacks import NestedScheduler
from nl_lightning.optim import LevelAwareAdamW, LevelAwareSGD, NestedOptimizer
from tests.conftest import changed_at

GLOBAL_BATCH = 8


def global_batch(key: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(key)
    return torch.randn(GLOBAL_BATCH, 4, generator=generator), torch.randn(GLOBAL_BATCH, 2, generator=generator)


class Indices(Dataset):
    """The loader only paces the loop: each batch is a pure function of the optimizer step."""

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, index: int) -> int:
        return index


class TinyRegression(LightningModule):
    """Two layers, ``fast`` and ``slow``. Batch ``k`` of optimizer step ``s`` is ``global_batch(s·A + k)``
    (A = accumulate_grad_batches), so a resumed run sees the same data; each DDP rank takes its slice."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, group_periods: dict[str, int] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fast = nn.Linear(4, 8)
        self.slow = nn.Linear(8, 2)
        self.optimizer_name, self.lr, self.group_periods = optimizer, lr, group_periods

    def forward(self, x):
        return self.slow(torch.tanh(self.fast(x)))

    def training_step(self, batch, batch_idx):
        accumulate = self.trainer.accumulate_grad_batches
        x, y = global_batch(self.global_step * accumulate + batch_idx % accumulate)
        rank, world = self.global_rank, self.trainer.world_size
        return F.mse_loss(self(x[rank::world]), y[rank::world])

    def train_dataloader(self):
        return DataLoader(Indices(), batch_size=1)

    def configure_optimizers(self):
        if self.group_periods is None:
            groups = [{"params": list(self.parameters())}]
        else:
            groups = [
                {"params": list(getattr(self, name).parameters()), "name": name, **({"period": p} if p else {})}
                for name, p in self.group_periods.items()
            ]
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr)
        if self.optimizer_name == "level_aware_adamw":
            return LevelAwareAdamW(groups, lr=self.lr)
        if self.optimizer_name == "level_aware_sgd":
            return LevelAwareSGD(groups, lr=self.lr)
        if self.optimizer_name == "nested":  # 3 levels, bridges and the λ pull, DMGD at every level
            return NestedOptimizer(groups, preset="google3", levels=[1, 2, 4], lr=self.lr, reg=1.0)
        return torch.optim.SGD(groups, lr=self.lr)


class Recorder(Callback):
    """Parameters after every training batch."""

    def __init__(self) -> None:
        self.history: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def fit(model, max_steps: int, callbacks=(), ckpt_path=None, **trainer_kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    trainer = Trainer(max_steps=max_steps, callbacks=list(callbacks), **{**options, **trainer_kwargs})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def sgd_reference(periods: dict[str, int], lr: float, steps: int) -> list[dict[str, torch.Tensor]]:
    """The SPEC §5 loop by hand: each gradient at the weights current when it is computed; a
    parameter of period P moves at steps P, 2P, … by −lr × the sum of its gradients since its last move."""
    model = TinyRegression()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    sums, history = {}, []
    for step in range(steps):  # Lightning's global_step before the step, which keys the batch
        x, y = global_batch(step)
        loss = F.mse_loss(torch.func.functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads):
                sums[name] = sums.get(name, torch.zeros_like(g)) + g
                if (step + 1) % periods.get(name, 1) == 0:
                    p -= lr * sums.pop(name)
        history.append({n: p.detach().clone() for n, p in params.items()})
    return history


def initial(name: str) -> torch.Tensor:
    return dict(TinyRegression().named_parameters())[name].detach().clone()


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{index}/{key}": value for index, entry in state.items() for key, value in entry.items()}


# -- the schedule -----------------------------------------------------------------------------------


def test_level_of_period_p_changes_only_at_multiples_of_p_by_lr_times_summed_gradients():
    recorder = Recorder()
    fit(TinyRegression(lr=0.1), max_steps=9, callbacks=[NestedScheduler({"slow.*": 3}), recorder])
    reference = sgd_reference({"slow.weight": 3, "slow.bias": 3}, lr=0.1, steps=9)
    assert changed_at(recorder.history, "slow.weight", initial("slow.weight")) == [3, 6, 9]
    assert changed_at(recorder.history, "fast.weight", initial("fast.weight")) == list(range(1, 10))
    for got, want in zip(recorder.history, reference, strict=True):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)


def test_skipped_level_adamw_step_equals_its_number_of_updates():
    model = TinyRegression(optimizer="adamw", lr=0.01)
    trainer = fit(model, max_steps=10, callbacks=[NestedScheduler({"slow.*": 4})])
    state = trainer.optimizers[0].state
    assert state[model.slow.weight]["step"].item() == 2
    assert state[model.slow.bias]["step"].item() == 2
    assert state[model.fast.weight]["step"].item() == 10


def test_model_that_knows_nothing_of_nl_lightning_gains_the_callback_in_a_few_lines():
    model, recorder = BoringModel(), Recorder()
    bias_before = model.layer.bias.detach().clone()
    trainer = Trainer(max_steps=8, callbacks=[NestedScheduler({"layer.bias": 4}), recorder],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model)
    assert changed_at(recorder.history, "layer.bias", bias_before) == [4, 8]
    assert trainer.callbacks[0].state_dict()["step"] == 8


def test_gradient_accumulation_counts_optimizer_steps_not_batches():
    recorder, scheduler = Recorder(), NestedScheduler({"slow.*": 2})
    fit(TinyRegression(), max_steps=4, callbacks=[scheduler, recorder], accumulate_grad_batches=2)
    assert len(recorder.history) == 8  # batches
    assert scheduler.state_dict()["step"] == 4
    assert changed_at(recorder.history, "fast.weight", initial("fast.weight")) == [2, 4, 6, 8]
    assert changed_at(recorder.history, "slow.weight", initial("slow.weight")) == [4, 8]


def test_level_aware_optimizer_is_not_scheduled_twice():
    """With a LevelAwareSGD the callback only logs; the trajectory is the callback-scheduled one."""
    by_callback, by_optimizer = Recorder(), Recorder()
    fit(TinyRegression(), max_steps=6, callbacks=[NestedScheduler({"slow.*": 3}), by_callback])
    scheduler = NestedScheduler()  # levels from the param groups
    model = TinyRegression(optimizer="level_aware_sgd", group_periods={"fast": None, "slow": 3})
    fit(model, max_steps=6, callbacks=[scheduler, by_optimizer])
    assert scheduler.state_dict()["schedule"] is None
    for got, want in zip(by_optimizer.history, by_callback.history, strict=True):
        assert all(torch.equal(got[name], want[name]) for name in want)


def test_non_finite_gradient_of_a_slow_level_stops_training_with_a_clear_error():
    class NaNAtStep3(TinyRegression):
        def on_after_backward(self):
            if self.global_step == 2:
                self.slow.weight.grad.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(NaN or inf\) at step 3 in level 'slow\.\*'"):
        fit(NaNAtStep3(), max_steps=5, callbacks=[NestedScheduler({"slow.*": 2})])


# -- checkpointing --------------------------------------------------------------------------------


# The data is a function of the step, so restarting the loader mid-epoch is harmless here.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_mid_cycle_is_bit_identical(tmp_path):
    uninterrupted = TinyRegression(optimizer="adamw", lr=0.01)
    full = fit(uninterrupted, max_steps=20, callbacks=[NestedScheduler({"slow.*": 5})])

    first = fit(TinyRegression(optimizer="adamw", lr=0.01), max_steps=7, callbacks=[NestedScheduler({"slow.*": 5})])
    checkpoint = tmp_path / "step7.ckpt"
    first.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]["NestedScheduler"]
    assert saved["step"] == 7 and sorted(saved["schedule"]["sums"]) == ["slow.bias", "slow.weight"]

    resumed_model = TinyRegression(optimizer="adamw", lr=0.01)
    resumed = fit(resumed_model, max_steps=20, callbacks=[NestedScheduler({"slow.*": 5})], ckpt_path=checkpoint)

    assert resumed.global_step == 20
    for (name, p), q in zip(uninterrupted.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    want, got = optimizer_tensors(full.optimizers[0]), optimizer_tensors(resumed.optimizers[0])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert want["2/step"].item() == 4  # slow.weight: updates at 5, 10, 15, 20


# -- distributed -------------------------------------------------------------------------------------


def test_ddp_on_two_cpu_processes_equals_one_process_with_the_same_global_batch():
    single = TinyRegression()
    fit(single, max_steps=6, callbacks=[NestedScheduler({"slow.*": 3})])
    ddp = TinyRegression()
    fit(ddp, max_steps=6, callbacks=[NestedScheduler({"slow.*": 3})], strategy="ddp_spawn", devices=2)
    untouched = TinyRegression()
    for (name, p), q, r in zip(single.named_parameters(), ddp.parameters(), untouched.parameters()):
        assert not torch.equal(q, r), f"{name} did not come back from the DDP workers"
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_ddp_with_the_nested_optimizer_equals_one_process_with_the_same_global_batch():
    """NestedOptimizer keeps its slower levels, bridges and gates in optimizer state on every rank:
    with DDP's averaged gradients every rank takes the single process's steps."""
    single = TinyRegression(optimizer="nested", lr=0.05)
    fit(single, max_steps=8, callbacks=[NestedScheduler(levels=None)])
    ddp = TinyRegression(optimizer="nested", lr=0.05)
    fit(ddp, max_steps=8, callbacks=[NestedScheduler(levels=None)], strategy="ddp_spawn", devices=2)
    untouched = TinyRegression(optimizer="nested")
    for (name, p), q, r in zip(single.named_parameters(), ddp.parameters(), untouched.parameters()):
        assert not torch.equal(q, r), f"{name} did not come back from the DDP workers"
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed on CPU (DS_ACCELERATOR=cpu, gloo): Lightning's strategy insists on CUDA; this skips that."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import argparse

        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=-1), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, deepspeed_optimizer


def train_under_deepspeed(stage: int, results) -> None:
    """In a fresh process: 9 steps of ZeRO-``stage`` with LevelAwareAdamW, levels read by NestedScheduler."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    model, recorder = TinyRegression(optimizer="level_aware_adamw", lr=0.01, group_periods={"fast": None, "slow": 3}), Recorder()
    trainer = fit(model, max_steps=9, callbacks=[NestedScheduler(), recorder],
                  strategy=CPUDeepSpeedStrategy(stage=stage, process_group_backend="gloo"))
    base = trainer.optimizers[0].optimizer
    buffer = io.BytesIO()  # bytes, not tensors: a tensor in a queue is shared memory that dies with this process
    torch.save((recorder.history, sorted(state["step"].item() for state in base.state.values())), buffer)
    results.put(buffer.getvalue())


@pytest.mark.slow  # DeepSpeed builds a communication op on first use
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_on_cpu_with_a_level_aware_optimizer_equals_plain_training(stage):
    pytest.importorskip("deepspeed")
    context = multiprocessing.get_context("spawn")  # DeepSpeed's process group stays out of this process
    results = context.Queue()
    worker = context.Process(target=train_under_deepspeed, args=(stage, results))
    worker.start()
    history, steps = torch.load(io.BytesIO(results.get(timeout=300)))
    worker.join()
    plain, recorder = TinyRegression(optimizer="level_aware_adamw", lr=0.01, group_periods={"fast": None, "slow": 3}), Recorder()
    fit(plain, max_steps=9, callbacks=[NestedScheduler(), recorder])
    assert steps == [3, 9]  # the slow group's AdamW state advanced at its 3 updates only
    assert changed_at(history, "slow.weight", initial("slow.weight")) == [3, 6, 9]
    for got, want in zip(history, recorder.history, strict=True):
        assert all(torch.equal(got[name], want[name]) for name in want)


# -- logging ------------------------------------------------------------------------------------------


def test_per_level_scalars_reach_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="nested")
    fit(TinyRegression(), max_steps=8, callbacks=[NestedScheduler({"fast.*": 1, "slow.*": 2}, log_every_n_steps=2)],
        logger=logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731
    assert scalars("nested/slow.*/updates") == [(2, 1.0), (4, 2.0), (6, 3.0), (8, 4.0)]
    assert scalars("nested/fast.*/updates") == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 8.0)]
    assert [step for step, _ in scalars("nested/slow.*/surprise")] == [4, 6, 8]  # from the 2nd update
    assert all(value > 0 for _, value in scalars("nested/slow.*/update_norm") + scalars("nested/fast.*/update_norm"))
    assert "nested/fast.*/surprise" not in events.Tags()["scalars"]  # period 1: no sums, no surprise


def test_optimizer_level_stats_are_logged_under_nested(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="nested")
    model = TinyRegression(optimizer="level_aware_sgd", group_periods={"fast": None, "slow": 2})
    fit(model, max_steps=6, callbacks=[NestedScheduler(log_every_n_steps=3)], logger=logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {"nested/slow/updates", "nested/slow/surprise", "nested/slow/update_norm"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("nested/slow/updates")] == [(3, 1.0), (6, 3.0)]


# -- bad configurations ---------------------------------------------------------------------------


class FakeDeepSpeedStrategy(SingleDeviceStrategy):
    """Only the name matters: NestedScheduler applies its DeepSpeed rules by strategy name."""


def frozen_slow() -> TinyRegression:
    model = TinyRegression()
    model.slow.requires_grad_(False)
    return model


def with_duck_typed_nested_optimizer() -> TinyRegression:
    class OwnLevels(torch.optim.SGD):
        def level_stats(self):
            return {}

    model = TinyRegression()
    model.configure_optimizers = lambda: OwnLevels(model.parameters(), lr=0.1)
    return model


BAD_CONFIGS = {
    "glob matching nothing": (TinyRegression, {"levels": {"slwo.*": 2}}, {},
                              r"level 'slwo\.\*' matches no parameter of TinyRegression; fix the glob"),
    "parameter claimed twice": (TinyRegression, {"levels": {"slow.*": 2, "*.weight": 4}}, {},
                                r"parameter 'slow\.weight' is matched by levels 'slow\.\*' and '\*\.weight'; "
                                "make the globs disjoint"),
    "zero period": (TinyRegression, {"levels": {"slow.*": 0}}, {}, "has period 0; a period must be a positive integer"),
    "negative period": (TinyRegression, {"levels": {"slow.*": -3}}, {}, "has period -3; a period must be a positive"),
    "fractional period": (TinyRegression, {"levels": {"slow.*": 2.5}}, {}, "has period 2.5; a period must be a positive"),
    "level without trainable parameters": (frozen_slow, {"levels": {"slow.*": 2}}, {},
                                           r"level 'slow\.\*' has no trainable parameters .* drop the level or unfreeze"),
    "bridge to an unknown level": (TinyRegression, {"levels": {"slow.*": 2}, "bridges": [("slow.*", "medium")]}, {},
                                   r"bridge 'slow\.\*' -> 'medium' names unknown level 'medium'; bridges must connect"),
    "bridge from a level to itself": (TinyRegression, {"levels": {"slow.*": 2}, "bridges": [("slow.*", "slow.*")]}, {},
                                      "must be a pair of two different levels"),
    "no period anywhere with levels=None": (TinyRegression, {}, {},
                                            r"reads 'period' from the optimizer's param groups, but none has one; "
                                            r"pass levels=\{glob: period\}"),
    "DeepSpeed with param groups mixing periods": (
        lambda: TinyRegression(optimizer="level_aware_sgd"), {"levels": {"slow.*": 3}},
        {"strategy": FakeDeepSpeedStrategy(device=torch.device("cpu"))},
        r"DeepSpeed owns the optimizer step and can only skip whole param groups, but param group 0 mixes "
        r"parameters of different periods: <unmatched> \(period 1\), slow\.\* \(period 3\); give each level its own "
        "param group with 'period' set"),
    "DeepSpeed with an optimizer that cannot skip levels": (
        lambda: TinyRegression(group_periods={"fast": None, "slow": 3}), {"levels": {"slow.*": 3}},
        {"strategy": FakeDeepSpeedStrategy(device=torch.device("cpu"))},
        r"under DeepSpeed the engine owns the optimizer step, so the optimizer must schedule levels itself, but SGD "
        r"does not; use nl_lightning\.optim\.LevelAwareAdamW"),
    "group period disagreeing with the level": (
        lambda: TinyRegression(optimizer="level_aware_sgd", group_periods={"fast": None, "slow": 4}),
        {"levels": {"slow.*": 3}}, {},
        r"LevelAwareSGD schedules the levels itself, but param group 1 has period 4 while its parameters belong to a "
        r"level of period 3; set 'period': 3 on that group"),
    "per-parameter periods with an optimizer running its own levels": (
        with_duck_typed_nested_optimizer, {"levels": {"slow.*": 3}}, {},
        r"OwnLevels runs its own levels and does not skip parameters by period, so levels \{'slow\.\*': 3\} would be "
        "ignored"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_fails_before_training_with_a_message_naming_the_fix(case):
    make_model, scheduler_args, trainer_args, message = BAD_CONFIGS[case]
    model, recorder = make_model(), Recorder()
    with pytest.raises(ValueError, match=message):
        fit(model, max_steps=2, callbacks=[NestedScheduler(**scheduler_args), recorder], **trainer_args)
    assert recorder.history == []


def test_log_interval_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="log_every_n_steps must be a positive integer, got 0"):
        NestedScheduler({"slow.*": 2}, log_every_n_steps=0)
