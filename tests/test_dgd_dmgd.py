"""DGD (delta gradient descent) and DMGD (deep momentum): references, reductions, checkpoints, levels."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning.callbacks import DGDInputCapture
from nl_lightning.optim import DGD, DMGD, DeepMomentum, MomentumSGD, NestedOptimizer

# -- hand-computed references on a 2×3 problem (explicit float64 formulas) ------------------------


def _batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64))
            for _ in range(steps)]


def test_dgd_first_steps_match_the_hand_computed_delta_rule_on_a_2x3_linear_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2, dtype=torch.float64)
    W, c = layer.weight.detach().clone(), layer.bias.detach().clone()
    lr, decay = 0.1, 2.0
    opt = DGD(layer.parameters(), lr=lr, decay=decay)
    opt.watch(layer)
    for X, Y in _batches(3):
        # reference: loss ½ mean_t ‖W x_t + c − y_t‖²; Â = Σ x xᵀ / Σ ‖x‖²
        residual = X @ W.T + c - Y
        grad_W, grad_c = residual.T @ X / 4, residual.mean(0)
        A_hat = X.T @ X / X.square().sum()
        W = W - lr * decay * W @ A_hat - lr * grad_W
        c = c - lr * grad_c  # plain GD for everything but linear weights
        opt.zero_grad()
        (0.5 * (layer(X) - Y).square().sum(-1).mean()).backward()
        opt.step()
        torch.testing.assert_close(layer.weight.detach(), W, rtol=0, atol=1e-13)
        torch.testing.assert_close(layer.bias.detach(), c, rtol=0, atol=1e-13)


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


# -- DGD's input-aware decay ----------------------------------------------------------------------


def test_dgd_decay_uses_the_captured_inputs_even_with_a_zero_gradient():
    layer = torch.nn.Linear(3, 2, bias=False, dtype=torch.float64)
    W = layer.weight.detach().clone()
    opt = DGD(layer.parameters(), lr=0.3)
    opt.watch(layer)
    x = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    layer(x)  # captured; the loss ignores the output, so the gradient is zero
    layer.weight.grad = torch.zeros_like(layer.weight)
    opt.step()
    expected = W - 0.3 * W @ x.T @ x / x.square().sum()  # −η' W x xᵀ / ‖x‖²
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-14)
    assert not torch.equal(layer.weight.detach(), W)
    layer.weight.grad = torch.zeros_like(layer.weight)
    before = layer.weight.detach().clone()
    opt.step()  # no forward since: the inputs were consumed, so nothing moves
    assert torch.equal(layer.weight.detach(), before)


def test_dgd_ignores_forwards_without_gradients_and_warns_when_nothing_is_watched():
    layer = torch.nn.Linear(3, 2, bias=False)
    opt = DGD(layer.parameters(), lr=0.1)
    handle = opt.watch(layer)
    with torch.no_grad():
        layer(torch.randn(5, 3))  # validation-style forward
    assert "input_outer" not in opt.state[layer.weight]
    handle.remove()
    with pytest.raises(RuntimeError, match="already watched"):
        opt.watch(layer), opt.watch(layer)
    plain = DGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    for p in plain.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="plain gradient descent"):
        plain.step()


def test_dgd_refuses_a_decay_factor_that_is_not_a_contraction():
    layer = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"lr·decay = 0.5·4 = 2 > 1; lower decay below 2"):
        DGD(layer.parameters(), lr=0.5, decay=4.0)
    opt = DGD(layer.parameters(), lr=0.5, decay=2.0)  # η' = 1 is the edge, still fine
    opt.watch(layer)
    opt.param_groups[0]["lr"] = 0.6  # e.g. raised by a scheduler
    layer.weight.grad = torch.zeros_like(layer.weight)
    with pytest.raises(ValueError, match="no longer a contraction .* 0.6·2 = 1.2 > 1"):
        opt.step()


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
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = _model()
    twin.load_state_dict(saved["model"])
    twin_opt = _optimizer(kind, twin)
    twin_opt.load_state_dict(saved["opt"])
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


def test_dgd_period_group_decays_with_the_inputs_of_its_whole_cycle_and_the_summed_gradient():
    layer = torch.nn.Linear(3, 2, bias=False, dtype=torch.float64)
    W = layer.weight.detach().clone()
    opt = DGD([{"params": [layer.weight], "period": 2}], lr=0.1)
    opt.watch(layer)
    batches = _batches(2, seed=3)
    for X, Y in batches:
        opt.zero_grad()
        (0.5 * (layer(X) - Y).square().sum()).backward()
        opt.step()
    X = torch.cat([x for x, _ in batches])
    grad_sum = sum((x @ W.T - y).T @ x for x, y in batches)  # both gradients at W: no update in between
    expected = W - 0.1 * W @ X.T @ X / X.square().sum() - 0.1 * grad_sum
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-13)


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


def test_dgd_non_finite_captured_inputs_raise_before_the_weights_change():
    layer = torch.nn.Linear(3, 2)
    opt = DGD(layer.parameters(), lr=0.1)
    opt.watch(layer)
    layer(torch.tensor([[1.0, math.inf, 0.0]]))
    layer.weight.grad, layer.bias.grad = torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(FloatingPointError, match="non-finite inputs"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


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


# -- the Lightning callback -----------------------------------------------------------------------


class _Regression(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return DGD(self.parameters(), lr=0.1)


def _fit(module: LightningModule, callbacks: list) -> Trainer:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = Trainer(max_steps=3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer


def test_dgd_input_capture_callback_feeds_the_linear_inputs_during_fit_and_detaches_after():
    torch.manual_seed(0)
    module, twin = _Regression(), _Regression()
    twin.load_state_dict(module.state_dict())
    trainer = _fit(module, [DGDInputCapture()])
    state = trainer.optimizers[0].state[module.net[0].weight]
    assert state["input_outer"].shape == (4, 4) and state["input_sq_norm"] == 0  # captured, then consumed
    assert not module.net[0]._forward_pre_hooks  # removed at the end of fit
    with pytest.warns(UserWarning, match="plain gradient descent"):
        _fit(twin, [])  # same data and start, no callback: plain GD
    assert not torch.allclose(module.net[0].weight, twin.net[0].weight)  # the decay term acted


def test_dgd_input_capture_callback_refuses_a_run_without_dgd():
    plain = _Regression()
    plain.configure_optimizers = lambda: torch.optim.SGD(plain.parameters(), lr=0.1)
    with pytest.raises(MisconfigurationException, match="no DGD optimizer"):
        _fit(plain, [DGDInputCapture()])
