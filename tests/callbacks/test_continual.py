"""EWC, SI and experience replay against their formulas; every composition of recipes/continual trains."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import chisquare
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import TensorDataset

from nl_lightning.callbacks import EWC, ExperienceReplay, ReservoirBuffer, SynapticIntelligence
from nl_lightning.cli import main
from tests.conftest import config_args
from nl_lightning.modules import ContinualClassifier

REPO_ROOT = Path(__file__).resolve().parents[2]
# The compositions of recipes/continual (method -> config files, in stacking order) are the sweep's
# (once each: the joint upper bound is the base composition with a data override).
_METHODS = yaml.safe_load((REPO_ROOT / "recipes/sweeps/continual.yaml").read_text())["methods"]
COMPOSITIONS = {name: entry["configs"] for name, entry in _METHODS.items() if "overrides" not in entry
                or any(not key.startswith("data.") for key in entry["overrides"])}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only spin and wait


class TwoParameters(ContinualClassifier):
    """A module whose only weights are θ ∈ R² (for SI's hand-computed path integral)."""

    def __init__(self) -> None:
        super().__init__(network=nn.Identity())
        self.theta = nn.Parameter(torch.zeros(2))


def tiny_classifier(dataset: TensorDataset) -> ContinualClassifier:
    torch.manual_seed(0)
    module = ContinualClassifier(network=nn.Linear(2, 3))
    module.task_dataset = lambda task, split="train": dataset  # what a ContinualDataModule would serve
    return module


# -- EWC ------------------------------------------------------------------------------------------


def test_ewc_fisher_is_the_mean_squared_per_example_log_likelihood_gradient():
    data = TensorDataset(torch.randn(7, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    module = tiny_classifier(data)
    expected = {name: torch.zeros_like(p) for name, p in module.named_parameters()}
    for x, y in zip(*data.tensors):  # one backward pass per example, by hand
        module.zero_grad()
        F.log_softmax(module(x[None]), -1)[0, y].backward()
        for name, p in module.named_parameters():
            expected[name] += p.grad.square() / len(data)
    fisher = EWC(strength=1.0).fisher(module, task=0)
    assert fisher.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name])


def test_online_ewc_penalty_is_half_lambda_decayed_fisher_times_squared_distance():
    module = tiny_classifier(TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)))
    names = [name for name, _ in module.named_parameters()]
    f1 = {name: torch.rand_like(p) for name, p in module.named_parameters()}
    f2 = {name: torch.rand_like(p) for name, p in module.named_parameters()}
    ewc = EWC(strength=3.0, online=True, gamma=0.5)
    assert ewc.penalty(module) is None  # nothing learned yet
    ewc.consolidate(module, f1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3)
    anchor = {name: p.detach().clone() for name, p in module.named_parameters()}
    ewc.consolidate(module, f2)  # θ* moves to the current weights, F̃ = γ F1 + F2
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    params = dict(module.named_parameters())
    expected = 0.5 * 3.0 * sum(((0.5 * f1[n] + f2[n]) * (params[n] - anchor[n]) ** 2).sum() for n in names)
    torch.testing.assert_close(ewc.penalty(module), expected)


def test_offline_ewc_sums_one_penalty_per_task_with_its_own_anchor():
    module = tiny_classifier(TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)))
    fishers, anchors = [], []
    ewc = EWC(strength=2.0, online=False)
    for _ in range(2):
        fishers.append({name: torch.rand_like(p) for name, p in module.named_parameters()})
        anchors.append({name: p.detach().clone() for name, p in module.named_parameters()})
        ewc.consolidate(module, fishers[-1])
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
    params = dict(module.named_parameters())
    expected = 0.5 * 2.0 * sum(
        (f[n] * (params[n] - a[n]) ** 2).sum() for f, a in zip(fishers, anchors) for n in params
    )
    torch.testing.assert_close(ewc.penalty(module), expected)


# -- SI -------------------------------------------------------------------------------------------


def test_si_importance_is_the_clamped_path_integral_over_squared_change_plus_damping():
    module, si = TwoParameters(), SynapticIntelligence(strength=2.0, damping=0.1)
    theta = module.theta
    with torch.no_grad():
        theta.copy_(torch.tensor([2.0, 1.0]))
    si.on_task_start(None, module, task=0)
    # Known trajectory on L = ½ a θ²: θ1 descends; θ2 is pushed *up* its gradient (negative ω).
    a, lr = torch.tensor([1.0, 3.0]), 0.25
    start = theta.detach().clone()
    omega = torch.zeros(2)
    for _ in range(3):
        grad = a * theta.detach()
        step = torch.stack([-lr * grad[0], +lr * grad[1]])
        omega -= grad * step
        theta.grad = grad.clone()
        si.on_before_optimizer_step(None, module, None)
        with torch.no_grad():
            theta.add_(step)
        si.on_train_batch_end(None, module, None, None, 0)
    end = theta.detach().clone()
    si.on_task_start(None, module, task=1)
    expected_importance = omega.clamp_min(0) / ((end - start) ** 2 + 0.1)
    assert expected_importance[0] > 0 and expected_importance[1] == 0
    torch.testing.assert_close(si.importance["theta"], expected_importance)
    torch.testing.assert_close(si.anchor["theta"], end)
    with torch.no_grad():
        theta.add_(torch.tensor([0.5, -0.7]))
    expected_penalty = 2.0 * (expected_importance * (theta.detach() - end) ** 2).sum()
    torch.testing.assert_close(si.penalty(module), expected_penalty)


def test_si_state_dict_round_trip_restores_importance_and_running_path_integral():
    module, si = TwoParameters(), SynapticIntelligence()
    si.on_task_start(None, module, task=0)
    si.path_integral["theta"] += torch.tensor([0.3, 0.1])
    with torch.no_grad():
        module.theta.add_(1.0)
    si.on_task_start(None, module, task=1)
    restored = SynapticIntelligence()
    restored.load_state_dict(si.state_dict())
    for key in ("importance", "anchor", "path_integral", "task_start"):
        torch.testing.assert_close(getattr(restored, key), getattr(si, key))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: EWC(strength=-1.0), "strength"),
        (lambda: EWC(gamma=0.0), "gamma"),
        (lambda: SynapticIntelligence(damping=0.0), "damping"),
        (lambda: ExperienceReplay(buffer_size=0), "capacity"),
    ],
)
def test_bad_strategy_arguments_name_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# -- replay ---------------------------------------------------------------------------------------


def test_reservoir_buffer_keeps_every_example_with_equal_probability():
    stream, capacity, trials = 120, 12, 400
    counts = torch.zeros(stream)
    for seed in range(trials):
        buffer = ReservoirBuffer(capacity, seed=seed)
        for start in range(0, stream, 7):  # batches of 7: the batch boundaries must not matter
            ids = torch.arange(start, min(start + 7, stream))
            buffer.add(ids[:, None].float(), ids, torch.zeros_like(ids))
        assert len(buffer) == capacity and len(set(buffer.y.tolist())) == capacity
        counts[buffer.y] += 1
    expected = trials * capacity / stream  # inclusion probability capacity / N for every example
    assert chisquare(counts.numpy(), [expected] * stream).pvalue > 0.001


def test_reservoir_buffer_resumed_from_state_dict_continues_identically():
    first, second = ReservoirBuffer(5, seed=3), ReservoirBuffer(5, seed=99)
    ids = torch.arange(40)
    first.add(ids[:20, None].float(), ids[:20], ids[:20] // 10)
    second.load_state_dict(first.state_dict())
    for buffer in (first, second):
        buffer.add(ids[20:, None].float(), ids[20:], ids[20:] // 10)
    assert torch.equal(first.y, second.y) and first.seen == second.seen == 40
    assert torch.equal(first.sample(3)[1], second.sample(3)[1])


def test_replay_appends_stored_examples_with_their_task_ids_after_the_first_batch():
    replay = ExperienceReplay(buffer_size=8, replay_batch_size=3, seed=0)
    first = (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long))
    out = replay.transform_batch(first, pl_module=None)
    assert out is first  # nothing stored yet, and the batch that brings examples never replays them
    second = (torch.randn(4, 2), torch.tensor([2, 3, 2, 3]), torch.ones(4, dtype=torch.long))
    x, y, task = replay.transform_batch(second, pl_module=None)
    assert x.shape == (7, 2) and torch.equal(y[:4], second[1]) and torch.equal(task[:4], second[2])
    assert set(y[4:].tolist()) <= {0, 1} and (task[4:] == 0).all()  # replayed: task 0's examples
    assert len(replay.buffer) == 8


# -- recipes --------------------------------------------------------------------------------------


def few_steps(configs: list[str], save_dir: Path) -> list[str]:
    """Two tasks × 2 epochs × 2 batches: every task boundary, strategy hook and R row still happens."""
    return [
        "fit", *config_args(REPO_ROOT / path for path in configs),
        "--data.init_args.num_tasks=2", "--trainer.max_epochs=4",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]


def test_every_continual_variant_is_composed_and_every_fragment_used():
    assert {"finetune", "ewc", "si", "replay", "google3", "collab5", "collab5_adjacent", "collab5_fixed", "cms",
            "adaptability", "retention", "balanced"} <= set(COMPOSITIONS)
    used = {REPO_ROOT / path for configs in COMPOSITIONS.values() for path in configs}
    assert used == set((REPO_ROOT / "recipes/continual").rglob("*.yaml")), "a fragment no composition uses"
    assert all(configs[0] == "recipes/continual/base.yaml" for configs in COMPOSITIONS.values())


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_continual_recipe_trains_fills_the_accuracy_matrix_and_logs_to_tensorboard(name, tmp_path):
    previous = os.getcwd()
    os.chdir(tmp_path)  # checkpoints of the default ModelCheckpoint land under the run
    try:
        main(few_steps(COMPOSITIONS[name], tmp_path / "runs"))
    finally:
        os.chdir(previous)
    (version,) = (tmp_path / "runs").glob("*/version_*")
    checkpoint = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)
    R = checkpoint["state_dict"]["accuracy_matrix"]
    assert R.shape == (2, 2) and torch.isfinite(R).all()
    events = EventAccumulator(str(version))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "continual/acc_task1", "continual/average_accuracy", "continual/retention"} <= scalars
    assert "continual/accuracy_matrix" in events.Tags()["images"]
    assert events.Scalars("continual/average_accuracy")[-1].value == pytest.approx(R[1].mean().item(), abs=1e-6)
