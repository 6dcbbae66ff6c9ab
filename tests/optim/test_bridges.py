"""Knowledge bridges of NestedOptimizer: topology, contraction, gate, message scale, linear transfer."""

from __future__ import annotations

import math

import pytest
import torch

from nl_lightning.optim import NestedOptimizer
from nl_lightning.optim.bridges import (
    adjacent_bridges,
    bridge_gate,
    max_path_length,
    non_adjacent_bridges,
    normalized_message,
    parse_bridges,
    undirected,
)


def weight(shape=(2, 3), seed=0) -> torch.nn.Parameter:
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))


def step_with(opt: NestedOptimizer, p: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    p.grad = grad.clone()
    opt.step()
    return opt.level_stats()


# -- topology -----------------------------------------------------------------------------------


def test_collab5_has_four_adjacent_and_five_non_adjacent_bridges_both_ways_with_max_path_two():
    opt = NestedOptimizer([weight()], preset="collab5")
    assert opt.level_names == ("UF", "F", "M", "S", "US") and opt.periods == (1, 5, 25, 125, 625)
    pairs = undirected(opt.bridges)
    assert len(pairs) == 9 and len(opt.bridges) == 18
    assert [p for p in pairs if p[1] - p[0] == 1] == adjacent_bridges(5) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    skips = [p for p in pairs if p[1] - p[0] > 1]  # UF–M, UF–S, F–S, F–US, M–US
    assert skips == non_adjacent_bridges(5) == [(0, 2), (0, 3), (1, 3), (1, 4), (2, 4)]
    assert {(b.source, b.target) for b in opt.bridges} == {d for i, j in pairs for d in [(i, j), (j, i)]}
    assert max_path_length(5, pairs) == 2
    assert max_path_length(5, adjacent_bridges(5)) == 4  # what the skips buy: 4 hops → 2
    assert opt.gate == "adaptive"


def test_google3_is_three_levels_with_adjacent_fixed_linear_bridges_and_max_path_two():
    opt = NestedOptimizer([weight()], preset="google3")
    assert opt.periods == (1, 10, 100) and opt.level_names == ("F", "M", "S")
    assert undirected(opt.bridges) == adjacent_bridges(3) == [(0, 1), (1, 2)]
    assert len(opt.bridges) == 4 and non_adjacent_bridges(3) == []
    assert max_path_length(3, undirected(opt.bridges)) == 2
    assert opt.gate == "fixed"


def test_max_path_length_is_infinite_for_a_disconnected_graph_and_zero_for_one_level():
    assert max_path_length(3, [(0, 1)]) == math.inf
    assert max_path_length(1, []) == 0


def test_bridge_lists_parse_directions_names_indices_and_explicit_strengths():
    names = ("UF", "F", "M")
    both = parse_bridges(["UF-F"], names, transfer_up=0.1, transfer_down=0.3)
    assert [(b.source, b.target, b.transfer) for b in both] == [(0, 1, 0.1), (1, 0, 0.3)]
    one_way = parse_bridges(["M->0"], names, 0.1, 0.3)
    assert [(b.source, b.target, b.transfer) for b in one_way] == [(2, 0, 0.3)]
    explicit = parse_bridges({"UF<->M": 0.25}, names, 0.1, 0.3)
    assert {(b.source, b.target, b.transfer) for b in explicit} == {(0, 2, 0.25), (2, 0, 0.25)}
    with pytest.raises(ValueError, match="unknown level 'X'"):
        parse_bridges(["UF-X"], names, 0.1, 0.1)
    with pytest.raises(ValueError, match="listed twice"):
        parse_bridges(["UF-F", "F->UF"], names, 0.1, 0.1)


# -- contraction --------------------------------------------------------------------------------


def test_bridges_that_do_not_contract_into_a_level_raise_and_name_it():
    with pytest.raises(ValueError, match=r"bridges into level M do not contract: Σγ = 1\.1") as info:
        NestedOptimizer([weight()], preset="collab5", bridges={"UF->M": 0.6, "F->M": 0.5})
    assert "UF->M: 0.6" in str(info.value) and "lower" in str(info.value)
    with pytest.raises(ValueError, match="into level F"):  # 0.1 up from UF + 3 × 0.3 down = 1.0
        NestedOptimizer([weight()], preset="collab5", transfer_down=0.3)
    NestedOptimizer([weight()], preset="collab5", transfer_down=0.29)  # 0.97 < 1 is fine


def test_an_unstable_reg_pull_raises_naming_the_live_level_at_construction_and_at_step():
    with pytest.raises(ValueError, match=r"pull on level UF .* lr·reg·Σw = 0\.25·4·1 = 1 ≥ 1"):
        NestedOptimizer([weight()], preset="collab5", lr=0.25, reg=4.0)
    p = weight()
    opt = NestedOptimizer([p], preset="google3", lr=0.1, reg=5.0)
    opt.param_groups[0]["lr"] = 0.3  # e.g. an lr scheduler
    p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="pull on level F"):
        opt.step()


# -- gate ---------------------------------------------------------------------------------------


def test_gate_opens_monotonically_with_surprise():
    surprise = torch.tensor([0.0, 0.5, 1.0, 2.0, 8.0])
    gates = bridge_gate(surprise, 4.0, torch.tensor(1.0))
    assert torch.all(gates[1:] > gates[:-1])
    torch.testing.assert_close(gates[2], torch.tensor(0.5))


def _gate_after_second_gradient(sign: float) -> dict[str, float]:
    """Two ticks of the fast level: after the first, its momentum predicts m = g; the second brings ḡ = ±g."""
    p = weight()
    opt = NestedOptimizer(
        [p], levels=[1, 2], level_names=["fast", "slow"], bridges=["fast->slow"], gate="static",
        gate_sharpness=4.0, gate_threshold=1.0, reg=0.0, lr=0.01,
    )
    g = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert step_with(opt, p, g)["level/fast/surprise"] == 1.0  # no prediction on a first tick
    return step_with(opt, p, sign * g)


def test_a_high_surprise_level_opens_its_gate_more_than_a_low_surprise_one():
    low, high = _gate_after_second_gradient(+1.0), _gate_after_second_gradient(-1.0)
    assert low["level/fast/surprise"] == pytest.approx(0.0, abs=1e-6)  # ‖g − g‖ / ‖g‖
    assert high["level/fast/surprise"] == pytest.approx(2.0, rel=1e-6)  # ‖−g − g‖ / ‖g‖
    for stats in (low, high):  # σ(a (s − τ)) with a = 4, τ = 1
        s = stats["level/fast/surprise"]
        assert stats["bridge/fast->slow/gate"] == pytest.approx(1 / (1 + math.exp(-4.0 * (s - 1.0))), rel=1e-6)
    assert high["bridge/fast->slow/gate"] > 0.98 > 0.02 > low["bridge/fast->slow/gate"]


def test_adaptive_gate_compares_surprise_with_its_running_average_at_the_bridge():
    p = weight()
    opt = NestedOptimizer([p], levels=[1, 2], level_names=["fast", "slow"], bridges=["fast->slow"], reg=0.0, lr=0.01)
    assert opt.gate == "adaptive"
    torch.manual_seed(1)
    threshold, gates = None, []
    for step in range(1, 13):
        stats = step_with(opt, p, torch.randn(2, 3, dtype=torch.float64) * (4.0 if step == 10 else 1.0))
        if step % 2:
            continue
        s = stats["level/fast/surprise"]
        if threshold is None:  # first firing: the average starts at the first value → half open
            threshold, expected = s, 0.5
        else:
            expected = 1 / (1 + math.exp(-4.0 * (s - threshold) / threshold))
        assert stats["bridge/fast->slow/gate"] == pytest.approx(expected, rel=1e-5)
        gates.append(stats["bridge/fast->slow/gate"])
        threshold = 0.9 * threshold + 0.1 * s
    assert gates[4] == max(gates) and gates[4] > 0.9  # the 4× gradient at step 10 is the surprise


# -- message ------------------------------------------------------------------------------------


def test_normalized_message_is_centred_with_the_requested_rms():
    x = torch.randn(4, 5, dtype=torch.float64) * 1e3 + 7.0
    message = normalized_message(x, torch.tensor(0.02, dtype=torch.float64))
    assert abs(message.mean().item()) < 1e-12
    assert message.square().mean().sqrt().item() == pytest.approx(0.02, rel=1e-9)
    torch.testing.assert_close(message, 0.02 * (x - x.mean()) / x.std(unbiased=False))
    assert torch.count_nonzero(normalized_message(torch.full((3,), 2.0), 1.0)) == 0


def _transfer_into_the_live_level(gap: float) -> tuple[float, float]:
    """(RMS of the slow→fast transfer, γ · gate · live update scale) with θ_slow − θ_fast ≈ gap."""
    p = weight((8, 16))
    opt = NestedOptimizer([p], levels=[1, 2], level_names=["fast", "slow"], bridges={"slow->fast": 0.3},
                          gate="static", reg=0.0, lr=0.05)
    grads = torch.randn(2, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    step_with(opt, p, grads[0])
    offset = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    opt.state[p]["levels"][1]["weight"].add_(gap * offset)
    stats = step_with(opt, p, grads[1])
    live_scale = opt.state[p]["levels"][0]["update_rms"].item()  # EMA of the RMS of the live level's updates
    applied = stats["bridge/slow->fast/transfer_norm"] / math.sqrt(p.numel())
    return applied, 0.3 * stats["bridge/slow->fast/gate"] * live_scale


@pytest.mark.parametrize("gap", [1e-3, 1.0, 1e3])
def test_transfer_rms_matches_the_target_levels_update_scale_whatever_the_gap(gap):
    applied, expected = _transfer_into_the_live_level(gap)
    assert applied == pytest.approx(expected, rel=1e-6)
    assert 0 < applied < 0.3 * 0.05 * 10  # a fraction of one live update (lr 0.05, |g| ~ 1), not ~gap
    assert applied == pytest.approx(_transfer_into_the_live_level(1.0)[0], rel=1e-6)


# -- linear transfer and schedule -----------------------------------------------------------------


def test_fixed_gate_transfer_is_the_linear_formula_applied_simultaneously_both_ways():
    p = weight()
    opt = NestedOptimizer([p], levels=[1, 2], level_names=["fast", "slow"], bridges=["fast-slow"], gate="fixed",
                          transfer_up=0.2, transfer_down=0.3, reg=0.0, lr=0.1)
    step_with(opt, p, torch.zeros(2, 3, dtype=torch.float64))  # creates θ_slow = θ_fast; nothing moves
    slow = opt.state[p]["levels"][1]["weight"]
    slow.add_(torch.randn(2, 3, dtype=torch.float64))
    fast_before, slow_before = p.detach().clone(), slow.clone()
    stats = step_with(opt, p, torch.zeros(2, 3, dtype=torch.float64))  # zero gradient: only the bridges act
    torch.testing.assert_close(p.detach(), fast_before + 0.3 * (slow_before - fast_before), rtol=0, atol=1e-15)
    torch.testing.assert_close(slow, slow_before + 0.2 * (fast_before - slow_before), rtol=0, atol=1e-15)
    assert stats["bridge/fast->slow/gate"] == stats["bridge/slow->fast/gate"] == 1.0
    assert stats["bridge/slow->fast/transfer_norm"] == pytest.approx(0.3 * (slow_before - fast_before).norm().item())


def test_bridges_fire_only_when_the_slower_level_ticks():
    p = weight()
    opt = NestedOptimizer([p], levels=[1, 3], level_names=["fast", "slow"], bridges=["fast-slow"], gate="fixed",
                          reg=0.0, lr=0.1)
    zero = torch.zeros(2, 3, dtype=torch.float64)
    step_with(opt, p, zero)
    opt.state[p]["levels"][1]["weight"].add_(1.0)  # the levels now differ; with zero gradients only bridges move p
    moved = []
    for step in range(2, 9):
        before = p.detach().clone()
        step_with(opt, p, zero)
        moved += [step] if not torch.equal(p.detach(), before) else []
    assert moved == [3, 6]
