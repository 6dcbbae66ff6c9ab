"""DGD (delta gradient descent, optim/dgd.py): the hand-computed delta rule, its input-aware decay,
level-aware periods and non-finite inputs (the contract it shares with DMGD is in test_dmgd.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nl_lightning.optim import DGD
from tests.optim.test_dmgd import _batches


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
