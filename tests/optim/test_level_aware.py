"""Level-aware stepping without Lightning: LevelSchedule and the LevelAwareOptimizer mixin."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nl_lightning.optim import LevelAwareAdamW, LevelAwareSGD, LevelSchedule, make_level_aware


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fast = nn.Linear(4, 8)
        self.slow = nn.Linear(8, 2)

    def forward(self, x):
        return self.slow(torch.tanh(self.fast(x)))


def loss_at(model: nn.Module, params: dict, step: int) -> torch.Tensor:
    x, y = batch(step)
    return F.mse_loss(torch.func.functional_call(model, params, (x,)), y)


def groups(model: TwoLayer, period: int) -> list[dict]:
    return [
        {"params": list(model.fast.parameters()), "name": "fast"},
        {"params": list(model.slow.parameters()), "name": "slow", "period": period},
    ]


def train(model: nn.Module, optimizer, steps: range) -> list[dict[str, torch.Tensor]]:
    history = []
    for step in steps:
        optimizer.zero_grad()
        loss_at(model, dict(model.named_parameters()), step).backward()
        optimizer.step()
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return history


def sgd_reference(model: nn.Module, periods: dict[str, int], lr: float, steps: int) -> list[dict[str, torch.Tensor]]:
    """Hand-rolled SPEC §5 loop: each gradient at the weights current when it is computed; a
    parameter of period P moves at steps P, 2P, … by −lr × the sum of its gradients since its last move."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    sums: dict[str, torch.Tensor] = {}
    history = []
    for step in range(1, steps + 1):
        grads = torch.autograd.grad(loss_at(model, params, step), list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads):
                period = periods.get(name, 1)
                sums[name] = sums.get(name, torch.zeros_like(g)) + g
                if step % period == 0:
                    p -= lr * sums.pop(name)
        history.append({n: p.detach().clone() for n, p in params.items()})
    return history


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of an optimizer's state dict, keyed by its path."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)

    walk("", optimizer.state_dict())
    return flat


def test_slow_group_changes_only_every_period_steps_by_lr_times_summed_gradients():
    model, lr, period = TwoLayer(), 0.1, 3
    reference = sgd_reference(TwoLayer(), {"slow.weight": period, "slow.bias": period}, lr, steps=9)
    history = train(model, LevelAwareSGD(groups(model, period), lr=lr), range(1, 10))
    initial = {n: p.detach().clone() for n, p in TwoLayer().named_parameters()}
    for step, (got, want) in enumerate(zip(history, reference), start=1):
        before = history[step - 2] if step > 1 else initial
        assert torch.equal(got["slow.weight"], before["slow.weight"]) == (step % period != 0), step
        assert not torch.equal(got["fast.weight"], before["fast.weight"])
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)


def test_skipped_group_adam_state_advances_once_per_update_like_adam_on_summed_gradients():
    model, period, steps = TwoLayer(), 4, 10
    optimizer = LevelAwareAdamW(groups(model, period), lr=0.01)
    train(model, optimizer, range(1, steps + 1))
    assert optimizer.state[model.slow.weight]["step"].item() == steps // period
    assert optimizer.state[model.fast.weight]["step"].item() == steps

    # The same slow layer trained by plain AdamW on the summed gradients at steps 4 and 8 only.
    twin = TwoLayer()
    plain = torch.optim.AdamW(groups(twin, period), lr=0.01)
    sums = {}
    for step in range(1, steps + 1):
        plain.zero_grad()
        loss_at(twin, dict(twin.named_parameters()), step).backward()
        for p in twin.slow.parameters():
            sums[p] = sums.get(p, 0) + p.grad
            p.grad = sums.pop(p) if step % period == 0 else None
        plain.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    torch.testing.assert_close(optimizer.state[model.slow.weight]["exp_avg_sq"], plain.state[twin.slow.weight]["exp_avg_sq"])


def test_state_dict_round_trip_mid_cycle_continues_bit_identically():
    uninterrupted = TwoLayer()
    optimizer = LevelAwareAdamW(groups(uninterrupted, 5), lr=0.01)
    train(uninterrupted, optimizer, range(1, 21))

    first = TwoLayer()
    first_optimizer = LevelAwareAdamW(groups(first, 5), lr=0.01)
    train(first, first_optimizer, range(1, 8))  # stops at step 7: two gradients summed, three to go
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    assert sorted(checkpoint["optimizer"]["level_schedule"]["sums"]) == ["1.0", "1.1"]

    resumed = TwoLayer()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = LevelAwareAdamW(groups(resumed, 5), lr=0.01)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, range(8, 21))

    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    want, got = optimizer_tensors(optimizer), optimizer_tensors(resumed_optimizer)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_stepping_one_group_at_a_time_like_deepspeed_zero_equals_one_step(zero_stage):
    """ZeRO-1/2 call the base optimizer once per group with param_groups narrowed to that group;
    ZeRO-3 once per sub-group, with the other groups' params emptied."""
    whole, per_group = TwoLayer(), TwoLayer()
    whole_optimizer = LevelAwareAdamW(groups(whole, 3), lr=0.01)
    zero_optimizer = LevelAwareAdamW(groups(per_group, 3), lr=0.01)
    train(whole, whole_optimizer, range(1, 8))
    all_groups = zero_optimizer.param_groups
    all_params = [group["params"] for group in all_groups]
    for step in range(1, 8):
        zero_optimizer.zero_grad()
        loss_at(per_group, dict(per_group.named_parameters()), step).backward()
        for index, group in enumerate(all_groups):
            if zero_stage == 3:
                for other, params in zip(all_groups, all_params):
                    other["params"] = params if other is group else []
            else:
                zero_optimizer.param_groups = [group]
            zero_optimizer.step()
        zero_optimizer.param_groups = all_groups
        for group, params in zip(all_groups, all_params):
            group["params"] = params
    for p, q in zip(whole.parameters(), per_group.parameters()):
        assert torch.equal(p, q)


def test_group_stepped_with_different_tensors_like_zero3_sub_groups_is_refused():
    model = TwoLayer()
    optimizer = LevelAwareSGD(groups(model, 2), lr=0.1)
    train(model, optimizer, range(1, 2))
    optimizer.param_groups[1]["params"] = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(RuntimeError, match="param group 1 was stepped with different tensors .* raise "
                       "zero_optimization.sub_group_size"):
        optimizer.step()


def test_non_finite_gradient_raises_before_it_is_summed():
    model = TwoLayer()
    optimizer = LevelAwareSGD(groups(model, 3), lr=0.1)
    train(model, optimizer, range(1, 2))
    loss_at(model, dict(model.named_parameters()), 2).backward()
    model.slow.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(NaN or inf\) at step 2 in level '1': \['1\.0'\]"):
        optimizer.step()


@pytest.mark.parametrize("period", [0, -2, 2.5, True])
def test_param_group_with_invalid_period_is_refused_at_construction(period):
    model = TwoLayer()
    with pytest.raises(ValueError, match=f"level 'slow' has period {period!r}; a period must be a positive integer"):
        LevelAwareSGD(groups(model, period), lr=0.1)


def test_group_added_after_training_started_counts_its_steps_from_there():
    model, extra = TwoLayer(), nn.Linear(4, 2)
    optimizer = LevelAwareSGD(groups(model, 2), lr=0.1)
    train(model, optimizer, range(1, 4))
    optimizer.add_param_group({"params": list(extra.parameters()), "name": "extra", "period": 2})
    weights = []
    for step in range(4, 8):
        optimizer.zero_grad()
        (loss_at(model, dict(model.named_parameters()), step) + extra(batch(step)[0]).square().mean()).backward()
        optimizer.step()
        weights.append(extra.weight.detach().clone())
    assert [torch.equal(a, b) for a, b in zip(weights, weights[1:])] == [False, True, False]  # moved at its steps 2, 4
    assert optimizer.level_stats()["extra/updates"] == 2.0


def test_closure_runs_before_levels_are_scheduled():
    model = TwoLayer()
    optimizer = LevelAwareSGD(groups(model, 2), lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = loss_at(model, dict(model.named_parameters()), 1)
        loss.backward()
        return loss

    slow_before = model.slow.weight.detach().clone()
    loss = optimizer.step(closure)
    assert loss is not None and torch.equal(model.slow.weight, slow_before)  # step 1 of period 2: skipped
    optimizer.step(closure)
    assert not torch.equal(model.slow.weight, slow_before)


def test_make_level_aware_reuses_ready_made_classes_and_wraps_others():
    assert make_level_aware(torch.optim.AdamW) is LevelAwareAdamW
    assert make_level_aware(LevelAwareSGD) is LevelAwareSGD
    adam = make_level_aware(torch.optim.Adam)
    assert adam.__name__ == "LevelAwareAdam" and issubclass(adam, torch.optim.Adam)
    model = TwoLayer()
    optimizer = adam(groups(model, 2), lr=0.01)
    train(model, optimizer, range(1, 4))
    assert optimizer.state[model.slow.weight]["step"].item() == 1
    assert set(optimizer.level_stats()) == {"slow/updates"}


def test_schedule_sums_low_precision_gradients_in_float32():
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    schedule = LevelSchedule({"slow": 3})
    for _ in range(2):
        p.grad = torch.full((4,), 1e-3, dtype=torch.bfloat16)
        schedule.step({"slow": {"p": p}})
        assert p.grad is None
    assert schedule.state_dict()["sums"]["p"].dtype == torch.float32


def test_schedule_reports_due_levels_updates_and_surprise():
    params = {name: nn.Parameter(torch.zeros(3)) for name in ("a", "b", "c")}
    schedule = LevelSchedule({"a": 1, "b": 2, "c": 3})
    due_at = []
    for step in range(1, 7):
        for p in params.values():
            p.grad = torch.ones(3) if step <= 4 else torch.tensor([1.0, -1.0, 2.0])
        due_at.append(schedule.step({name: {name: p} for name, p in params.items()}))
    assert due_at == [["a"], ["a", "b"], ["a", "c"], ["a", "b"], ["a"], ["a", "b", "c"]]
    assert [schedule.updates(name) for name in "abc"] == [6, 3, 2]
    assert schedule.surprise(["a"]) is None  # period 1: nothing is summed
    torch.testing.assert_close(params["b"].grad, torch.tensor([2.0, -2.0, 4.0]))  # steps 5 + 6
    # b's sums: (2,2,2), (2,2,2), then (2,−2,4): surprise ‖(0,−4,2)‖ / ‖(2,2,2)‖
    torch.testing.assert_close(schedule.surprise(["b"]), torch.tensor(20**0.5 / 12**0.5))
    # c's sums: (1,1,1)·3, then (1,1,1) + 2·(1,−1,2)
    torch.testing.assert_close(schedule.surprise(["c"]), torch.tensor(20**0.5 / 27**0.5))
