"""NestedOptimizer: level schedule, λ pull, checkpoints, non-finite gradients, presets, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nl_lightning.optim import NESTED_PRESETS, MomentumSGD, NestedOptimizer
from tests.conftest import reloaded

# -- the level schedule ---------------------------------------------------------------------------


def test_levels_tick_at_multiples_of_their_periods_with_the_summed_gradient():
    """Hand-computed reference on a 2×3 least-squares problem, momentum SGD at every level."""
    torch.manual_seed(0)
    X, Y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    W0 = torch.randn(2, 3, dtype=torch.float64)
    lr, mu, periods = 0.05, 0.9, (1, 2, 4)

    def grad(W):  # ∇_W ½‖X Wᵀ − Y‖²
        return (X @ W.T - Y).T @ X

    p = torch.nn.Parameter(W0.clone())
    opt = NestedOptimizer([p], lr=lr, levels=list(periods), bridges=[], reg=0.0, inner=MomentumSGD(mu))
    weights = [W0.clone() for _ in periods]
    buffers = [torch.zeros_like(W0) for _ in periods]
    sums = [torch.zeros_like(W0) for _ in periods]
    for step in range(1, 10):
        g = grad(weights[0])  # the gradient is always taken at the live weights
        opt.zero_grad()
        loss = 0.5 * (X @ p.T - Y).square().sum()
        loss.backward()
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)
        opt.step()
        for k, period in enumerate(periods):
            sums[k] += g
            if step % period == 0:
                buffers[k] = mu * buffers[k] + sums[k]
                weights[k] = weights[k] - lr * buffers[k]
                sums[k] = torch.zeros_like(W0)
        levels = opt.state[p]["levels"]
        torch.testing.assert_close(p.detach(), weights[0], rtol=0, atol=1e-12)
        for k in (1, 2):
            torch.testing.assert_close(levels[k]["weight"], weights[k], rtol=0, atol=1e-12)
            torch.testing.assert_close(levels[k]["grad_sum"], sums[k], rtol=0, atol=1e-12)
        stats = opt.level_stats()
        assert [stats[f"level/{name}/ticks"] for name in ("F", "M", "S")] == [step // P for P in periods]
    assert not torch.equal(weights[2], W0) and not torch.equal(weights[1], weights[2])


def test_one_level_without_pull_is_torch_sgd_with_momentum():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    nested = NestedOptimizer(a.parameters(), lr=0.1, levels=[1], weight_decay=0.0, inner=MomentumSGD(0.9))
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        x = torch.randn(8, 5)
        for model, opt in ((a, nested), (b, sgd)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_reg_pulls_the_live_weights_toward_each_slower_level_by_lr_reg_w():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
    opt = NestedOptimizer([p], lr=0.1, levels=[1, 10, 100], bridges=[], reg=2.0, reg_weights=[3.0, 1.0])
    assert opt.reg_weights == (0.75, 0.25)  # normalised to sum 1
    p.grad = torch.zeros_like(p)
    opt.step()  # creates θ_1 = θ_2 = θ_0: no pull yet
    levels = opt.state[p]["levels"]
    levels[1]["weight"].add_(torch.randn(2, 3, dtype=torch.float64))
    levels[2]["weight"].add_(torch.randn(2, 3, dtype=torch.float64))
    theta0, theta1, theta2 = p.detach().clone(), levels[1]["weight"].clone(), levels[2]["weight"].clone()
    opt.step()  # zero gradient, no tick of the slow levels at step 2: only the pull acts
    expected = theta0 - 0.1 * 2.0 * (0.75 * (theta0 - theta1) + 0.25 * (theta0 - theta2))
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
    assert torch.equal(levels[1]["weight"], theta1) and torch.equal(levels[2]["weight"], theta2)


def test_weight_decay_shrinks_only_the_live_weights():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = NestedOptimizer([{"params": [p], "weight_decay": 0.5}], lr=0.1, levels=[1, 2], bridges=[], reg=0.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.95**2, dtype=torch.float64))
    assert torch.equal(opt.state[p]["levels"][1]["weight"], torch.ones(4, dtype=torch.float64))


# -- checkpoints and failures ---------------------------------------------------------------------


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _make(model: torch.nn.Module) -> NestedOptimizer:
    # five levels with short, non-nested periods so every level and bridge is mid-cycle somewhere
    return NestedOptimizer(model.parameters(), preset="collab5", levels=[1, 2, 3, 5, 8], lr=0.05, weight_decay=0.01)


def _train(model, opt, steps):
    for step in steps:
        data = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=data), torch.randint(0, 3, (16,), generator=data)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b


def test_resume_mid_cycle_is_bit_identical():
    straight = _mlp()
    straight_opt = _make(straight)
    _train(straight, straight_opt, range(1, 31))

    first = _mlp()
    first_opt = _make(first)
    _train(first, first_opt, range(1, 14))  # step 13: every level above UF is mid-cycle
    resumed, resumed_opt = reloaded(first, first_opt, _mlp, _make)
    _train(resumed, resumed_opt, range(14, 31))

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    _assert_same_state(straight_opt.state_dict(), resumed_opt.state_dict())
    assert straight_opt.level_stats() == resumed_opt.level_stats()
    assert straight_opt.level_stats()["level/US/ticks"] == 3.0


def test_loading_a_state_from_different_levels_is_refused():
    saved = _make(_mlp()).state_dict()
    other = NestedOptimizer(_mlp().parameters(), preset="google3")
    with pytest.raises(ValueError, match="same preset/levels/bridges"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_raise_and_never_reach_the_weights(bad):
    model, twin = _mlp(), _mlp()
    opt = NestedOptimizer(model.named_parameters(), preset="collab5", levels=[1, 2, 3, 5, 8], lr=0.05)
    twin_opt = NestedOptimizer(twin.named_parameters(), preset="collab5", levels=[1, 2, 3, 5, 8], lr=0.05)
    _train(model, opt, range(1, 4))
    _train(twin, twin_opt, range(1, 4))
    weights = [p.detach().clone() for p in model.parameters()]
    state = opt.state_dict()
    state = {"nested": {k: v.clone() if torch.is_tensor(v) else v for k, v in state["nested"].items()},
             "levels": [[{k: v.clone() for k, v in lv.items() if torch.is_tensor(v)} for lv in s["levels"]]
                        for s in state["state"].values()]}

    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    model[2].weight.grad[1, 3] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .* '2\.weight' .* step 4; nothing was updated"):
        opt.step()

    for p, before in zip(model.parameters(), weights):
        assert torch.equal(p, before)
    after = opt.state_dict()
    _assert_same_state(state["nested"], {k: after["nested"][k] for k in state["nested"]})
    for s, levels in zip(after["state"].values(), state["levels"]):
        _assert_same_state(levels, [{k: v for k, v in lv.items() if torch.is_tensor(v)} for lv in s["levels"]])
    _train(model, opt, range(4, 8))  # a finite step afterwards carries on as if nothing happened
    _train(twin, twin_opt, range(4, 8))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# -- configuration --------------------------------------------------------------------------------


def test_preset_numbers_and_overrides():
    params = [torch.nn.Parameter(torch.zeros(3))]
    default, collab5 = NestedOptimizer(params), NestedOptimizer(params, preset="collab5")
    assert default.bridges == collab5.bridges and default.periods == collab5.periods
    assert default.param_groups[0]["reg"] == 1.0
    expected = {  # preset: (reg, pull weights, γ up, γ down)
        "google3": (1.0, (0.5, 0.5), 0.1, 0.1),
        "collab5": (1.0, (0.25,) * 4, 0.1, 0.1),
        "adaptability": (0.1, (0.4, 0.3, 0.2, 0.1), 0.15, 0.05),
        "balanced": (3.0, (0.25,) * 4, 0.1, 0.125),
        "retention": (10.0, (0.1, 0.2, 0.3, 0.4), 0.05, 0.2),
    }
    assert set(NESTED_PRESETS) == set(expected)
    for name, (reg, weights, up, down) in expected.items():
        opt = NestedOptimizer(params, preset=name, lr=0.01)
        assert opt.param_groups[0]["reg"] == reg
        assert opt.reg_weights == pytest.approx(weights)
        assert {b.transfer for b in opt.bridges if b.target > b.source} == {up}
        assert {b.transfer for b in opt.bridges if b.target < b.source} == {down}
    three = NestedOptimizer(params, preset="retention", levels=[1, 4, 16], lr=0.01)  # a different level count
    assert three.level_names == ("F", "M", "S") and len(three.bridges) == 4 and three.reg_weights == (0.5, 0.5)
    assert three.param_groups[0]["reg"] == 10.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="google4"), "unknown preset 'google4'"),
        (dict(levels=[2, 10]), "must start with period 1"),
        (dict(levels=[1, 10, 10]), "strictly increasing"),
        (dict(levels=[1, 5], level_names=["a"]), "one per level"),
        (dict(reg_weights=[1.0, -1.0, 1.0, 1.0]), "non-negative"),
        (dict(gate="learned"), "gate must be one of"),
        (dict(slowest_period=3), "slowest_period must be an integer of at least 5"),
        (dict(slowest_period=84.0), "slowest_period must be an integer"),
    ],
)
def test_bad_configurations_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NestedOptimizer([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_language_model_param_groups_are_accepted_and_group_periods_refused():
    a, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    groups = [
        {"params": [a], "name": "cms.0", "period": 1, "level": 0},
        {"params": [b], "name": "cms.0", "period": 1, "level": 0, "weight_decay": 0.0},
    ]
    opt = NestedOptimizer(groups, preset="collab5", lr=0.01, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0] and opt.param_groups[1]["name"] == "cms.0"
    with pytest.raises(ValueError, match=r"param group 1 \('cms.1'\) has period=4.*remove 'period'"):
        NestedOptimizer([groups[0], {"params": [b], "name": "cms.1", "period": 4}], preset="collab5")


@pytest.mark.parametrize("preset, slowest, expected", [
    ("collab5", 84, (1, 3, 9, 28, 84)), ("collab5", 625, (1, 5, 25, 125, 625)), ("google3", 84, (1, 9, 84)),
    ("collab5", 5, (1, 2, 3, 4, 5)),
])
def test_slowest_period_respaces_the_levels_on_a_log_scale(preset, slowest, expected):
    opt = NestedOptimizer([torch.nn.Parameter(torch.zeros(3))], preset=preset, lr=0.01, slowest_period=slowest)
    assert opt.periods == expected
    p = opt.param_groups[0]["params"][0]
    for _ in range(slowest):
        p.grad = torch.ones(3)
        opt.step()
    assert opt.level_stats()[f"level/{opt.level_names[-1]}/ticks"] == 1.0  # the slowest level ticked once


def test_an_unstable_pull_is_refused_unless_allowed_and_then_warned():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"lr·reg·Σw = 0.04·50·1 = 2 ≥ 1.*allow_unstable_pull=True permits it"):
        NestedOptimizer([p], preset="google3", lr=0.04, reg=50)
    with pytest.warns(UserWarning, match="allow_unstable_pull=True"):
        opt = NestedOptimizer([p], preset="google3", lr=0.04, reg=50, allow_unstable_pull=True)
    p.grad = torch.ones(3)
    opt.step()  # takes the step instead of raising
    assert torch.isfinite(p).all()


def test_level_stats_name_every_level_and_bridge():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = NestedOptimizer([p], preset="collab5", lr=0.01)
    assert set(opt.level_stats().values()) == {0.0}
    for _ in range(5):
        p.grad = torch.randn(4, 4)
        opt.step()
    stats = opt.level_stats()
    assert len(stats) == 5 * 3 + 18 * 3
    assert stats["bridge/UF->F/fires"] == stats["bridge/F->UF/fires"] == 1.0  # F ticked once
    assert stats["bridge/UF->M/fires"] == 0.0
    assert stats["level/UF/ticks"] == 5.0 and stats["level/F/ticks"] == 1.0 and stats["level/M/ticks"] == 0.0
    assert stats["level/F/surprise"] == 1.0 and stats["level/UF/surprise"] > 0 and stats["level/F/update_norm"] > 0
    assert stats["bridge/UF->F/gate"] == stats["bridge/F->UF/gate"] == 0.5  # first firing, adaptive gate
    assert stats["bridge/UF->M/gate"] == 0.0 and stats["bridge/UF->M/transfer_norm"] == 0.0  # M has not ticked
    assert all(isinstance(v, float) for v in stats.values())


# -- it trains --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["collab5", "google3"])
def test_trains_an_mlp_on_digits(preset):
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(features / 16.0, dtype=torch.float32), torch.tensor(labels)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    opt = NestedOptimizer(model.parameters(), preset=preset, lr=0.05)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    batches = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(0, len(x), (64,), generator=batches)
        opt.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert math.isfinite(final) and final < 0.25 * initial, (initial, final)
    assert accuracy > 0.9
    stats = opt.level_stats()
    slowest_ticking = opt.level_names[2] if preset == "collab5" else opt.level_names[-1]  # M (25) / S (100)
    assert stats[f"level/{slowest_ticking}/ticks"] == 300 // opt.periods[opt.level_names.index(slowest_ticking)]
