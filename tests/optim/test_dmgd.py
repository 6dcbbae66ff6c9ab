"""DMGD (deep momentum): hand-computed references, reductions, DMGD as NestedOptimizer's inner rule; and
the contract DGD and DMGD share (closures, levels, checkpoints, non-finite values), run for both."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nl_lightning.optim import DGD, DMGD, DeepMomentum, MomentumSGD, NestedOptimizer
from tests.conftest import reloaded

# -- hand-computed references on a 2×3 problem (explicit float64 formulas) ------------------------


def _batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64))
            for _ in range(steps)]


def test_dmgd_first_steps_match_the_hand_computed_deep_momentum_on_a_2x3_problem():
    X, Y = _batches(1)[0]
    W0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lr, mu, memory_lr = 0.05, 0.9, 0.5
    p = torch.nn.Parameter(W0.clone())
    opt = DMGD([p], lr=lr, momentum=mu, hidden=2, memory_lr=memory_lr)

    W, b = W0.clone(), torch.zeros_like(W0)
    w1, c1, w2 = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([-2.0, 2.0], dtype=torch.float64), \
        torch.zeros(2, dtype=torch.float64)
    for t in range(4):
        u = (X @ W.T - Y).T @ X  # ∇_W ½‖X Wᵀ − Y‖²
        if t > 0:  # the memory's L2 regression step on u (explicit gradients of the 2-unit MLP)
            c = (1 - mu) / (1 - mu**t)
            s = b.square().mean().sqrt()
            x = b / s
            h = torch.tanh(x[..., None] * w1 + c1)  # (2, 3, H)
            e = c * (b + s * (h @ w2)) - u
            N = u.square().mean() + (c * s) ** 2
            back = (e * c * s)[..., None]
            d_w2 = (back * h).mean((0, 1)) / N
            d_pre = back * w2 * (1 - h.square())
            d_c1, d_w1 = d_pre.mean((0, 1)) / N, (d_pre * x[..., None]).mean((0, 1)) / N
            w1, c1, w2 = w1 - memory_lr * d_w1, c1 - memory_lr * d_c1, w2 - memory_lr * d_w2
            w2 = w2 / max(1.0, w2.abs().sum().item())
        b = mu * b + u
        s = b.square().mean().sqrt()
        W = W - lr * (b + s * (torch.tanh((b / s)[..., None] * w1 + c1) @ w2))

        opt.zero_grad()
        (0.5 * (X @ p.T - Y).square().sum()).backward()
        opt.step()
        torch.testing.assert_close(p.detach(), W, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["memory"], torch.cat([w1, c1, w2]), rtol=0, atol=1e-12)
    assert w2.abs().sum() > 0 and not torch.equal(w1, torch.ones(2, dtype=torch.float64))  # the memory learned


def test_dmgd_memory_of_a_large_tensor_trains_on_a_strided_subset_cycling_with_the_step():
    n, mu, memory_lr = 3 * 4096 + 5, 0.9, 0.5  # stride ⌈n / 4096⌉ = 4
    g = torch.Generator().manual_seed(0)
    u0, u1 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    rule = DeepMomentum(mu, hidden=2, memory_lr=memory_lr)
    state = rule.init_state(u0)
    rule.update(state, u0, lr=0.1)  # step 0: nothing to train on yet
    rule.update(state, u1, lr=0.1)  # step 1: trains on coordinates 1, 5, 9, … (offset 1 % 4)
    b = u0  # the buffer before absorbing u1; φ = 0 so far and c = (1 − μ) / (1 − μ) = 1
    s = b.square().mean().sqrt()  # normalised over the whole tensor, as the read-out is
    b_sub, u_sub = b[1::4], u1[1::4]
    h = torch.tanh((b_sub / s)[:, None] * torch.ones(2, dtype=torch.float64) + torch.tensor([-2.0, 2.0],
                                                                                           dtype=torch.float64))
    N = u_sub.square().mean() + s**2
    expected_w2 = -memory_lr * ((b_sub - u_sub)[:, None] * s * h).mean(0) / N
    torch.testing.assert_close(state["memory"][4:], expected_w2, rtol=0, atol=1e-13)


@pytest.mark.parametrize("memory", [dict(hidden=0), dict(hidden=8, memory_lr=0.0)], ids=["linear", "frozen-mlp"])
def test_dmgd_with_a_linear_memory_and_identity_sigma_is_torch_sgd_with_momentum(memory):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    b = copy.deepcopy(a)
    dmgd = DMGD(a.parameters(), lr=0.1, momentum=0.8, **memory)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.8)
    for _ in range(6):
        x = torch.randn(8, 5, dtype=torch.float64)
        for model, opt in ((a, dmgd), (b, sgd)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-14)


def test_deep_memory_learns_to_predict_an_alternating_gradient_better_than_linear_momentum():
    """u_t = (−1)ᵗ g: the linear memory (μ = 0: the last gradient) predicts the wrong sign every
    time (error 2); the MLP learns to flip its read-out as far as its bound |m − b| ≤ rms(b) allows."""
    g = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for name, rule in (("linear", DeepMomentum(0.0, hidden=0)), ("deep", DeepMomentum(0.0, hidden=8, memory_lr=0.5))):
        state = rule.init_state(g)
        for t in range(120):
            u = g * (-1) ** t
            if t >= 90:
                errors.setdefault(name, []).append((rule.prediction(state, t) - u).norm() / u.norm())
            rule.update(state, u, lr=0.1)
    linear, deep = (torch.stack(errors[k]).mean().item() for k in ("linear", "deep"))
    assert linear == pytest.approx(2.0) and deep < 0.75 * linear, (deep, linear)


# -- both optimizers: closures, levels, checkpoints, non-finite values -----------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    first, second = model[0], model[2]
    groups = [{"params": list(first.parameters()), "name": "fast"},
              {"params": list(second.parameters()), "name": "slow", "period": 2}]
    if kind == "dgd":
        opt = DGD(groups, lr=0.1)
        opt.watch(model)
        return opt
    return DMGD(groups, lr=0.05, memory_lr=0.3)


def _train(model, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["dgd", "dmgd"])
def test_resuming_from_a_state_dict_mid_cycle_is_bit_identical(kind):
    model = _model()
    opt = _optimizer(kind, model)
    _train(model, opt, 3, seed=1)  # the period-2 group is half-way through its cycle
    twin, twin_opt = reloaded(model, opt, _model, lambda m: _optimizer(kind, m))
    _train(model, opt, 4, seed=2)
    _train(twin, twin_opt, 4, seed=2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["dgd", "dmgd"])
def test_a_group_with_period_updates_only_every_period_steps(kind):
    model = _model()
    opt = _optimizer(kind, model)
    slow = model[2].weight
    history = [slow.detach().clone()]
    for step in range(1, 5):
        _train(model, opt, 1, seed=step)
        history.append(slow.detach().clone())
    assert torch.equal(history[1], history[0]) and torch.equal(history[3], history[2])
    assert not torch.equal(history[2], history[1]) and not torch.equal(history[4], history[3])
    assert opt.level_stats()["slow/updates"] == 2.0


@pytest.mark.parametrize("kind", ["dgd", "dmgd"])
def test_a_non_finite_gradient_raises_before_any_weight_or_state_changes(kind):
    model = _model()
    opt = _optimizer(kind, model)
    _train(model, opt, 2, seed=1)
    model(torch.randn(3, 4)).sum().backward()  # DGD captures these inputs: part of the state to keep
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model[0].bias.grad[0] = math.inf  # the period-1 group is checked too, before the schedule advances
    model[2].bias.grad[0] = math.nan
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .*shape \(8,\)\) of param group 0"):
        opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = opt.state_dict()
    assert after["level_schedule"]["steps"] == state["level_schedule"]["steps"]
    for p_id, entries in state["state"].items():
        for key, value in entries.items():
            assert torch.equal(after["state"][p_id][key], value), key


# -- DMGD as NestedOptimizer's inner rule ---------------------------------------------------------


def test_nested_optimizer_defaults_to_deep_momentum_and_trains_a_tiny_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = NestedOptimizer(model.parameters(), levels=[1, 2, 4], lr=0.05)
    assert isinstance(opt.inner, DeepMomentum) and not isinstance(opt.inner, MomentumSGD)
    x = torch.randn(64, 4)
    y = x[:, :1] * x[:, 1:2] + torch.sin(x[:, 2:3])
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])
    memory = opt.state[model[0].weight]["levels"][0]["inner"]["memory"]
    assert memory.view(3, -1)[2].abs().sum() > 0  # the deep memory was trained online


def test_deep_momentum_prediction_is_exact_for_a_constant_gradient_so_surprise_is_zero():
    p = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt = NestedOptimizer([p], levels=[1, 2], bridges=[], reg=0.0, lr=0.01)
    for _ in range(6):
        p.grad = torch.full_like(p, 0.5)
        opt.step()
    stats = opt.level_stats()
    for name in opt.level_names:
        assert stats[f"level/{name}/ticks"] >= 3 and stats[f"level/{name}/surprise"] == pytest.approx(0.0, abs=1e-9)
