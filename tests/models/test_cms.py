"""Continuum Memory System levels, including the optional in-context fast weights."""

import pytest
import torch

from nl_lightning.models.cms import CMSLevel, ContinuumMemory, _in_context_solve, _swiglu_hidden


def naive_in_context(level: CMSLevel, x: torch.Tensor, period: int, lr: float):
    """Token-by-token reference: accumulate each pair's gradient, apply the sum every `period` tokens."""
    batch, length, dim = x.shape
    hidden = torch.nn.functional.silu(level.mlp.gate(level.norm(x))) * level.mlp.up(level.norm(x))
    delta = x.new_zeros(batch, dim, hidden.shape[-1])
    grad = torch.zeros_like(delta)
    outputs, previous = [], None
    for t in range(length):
        a = hidden[:, t]
        out = x[:, t] + level.mlp.down(a) + torch.einsum("bdh,bh->bd", delta, a)
        outputs.append(out)
        if previous is not None:  # the pair (t-1, t) is complete: L = |pred_{t-1} - x_t|^2
            pred, a_prev = previous
            grad = grad + 2 * torch.einsum("bd,bh->bdh", pred - x[:, t], a_prev)
        previous = (out, a)
        if (t + 1) % period == 0 or t == length - 1:  # chunk end, or flush the final partial chunk
            delta = delta - (lr / period) * grad
            grad = torch.zeros_like(grad)
    return torch.stack(outputs, dim=1), delta


def make_level(dim=8, hidden=16, seed=0) -> CMSLevel:
    torch.manual_seed(seed)
    level = CMSLevel(dim, hidden, eps=1e-6).double()
    for p in level.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return level


@pytest.mark.parametrize("impl", ["solve", "loop"])
@pytest.mark.parametrize("period", [1, 3, 4, 16])
def test_in_context_updates_equal_the_token_by_token_reference(period, impl):
    level = make_level()
    x = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    out, delta = level.forward_in_context(x, period, lr=0.05, impl=impl)
    ref_out, ref_delta = naive_in_context(level, x, period, lr=0.05)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(delta, ref_delta)
    grads = torch.autograd.grad(out.square().sum(), [x, *level.parameters()])
    ref_grads = torch.autograd.grad(ref_out.square().sum(), [x, *level.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("period, block_tokens", [(1, 1), (1, 7), (2, 4), (3, 7), (5, 12), (4, 256)])
def test_the_blockwise_solve_equals_the_chunk_loop_across_blocks_and_from_a_given_state(period, block_tokens):
    """Blocks smaller than the sequence carry the pair that crosses into them, and a delta handed in
    (a continued sequence) is where both start: forward, final state and every gradient agree."""
    level = make_level()
    x = torch.randn(2, 50, 8, dtype=torch.float64, requires_grad=True)
    start = (0.1 * torch.randn(2, 8, 16, dtype=torch.float64)).requires_grad_()
    hidden = _swiglu_hidden(level.mlp, level.norm(x))
    fixed = x + level.mlp.down(hidden)
    out, delta = _in_context_solve(x, fixed, hidden, start, period, 0.05, block_tokens=block_tokens)
    ref_out, ref_delta = level.forward_in_context(x, period, lr=0.05, delta=start, impl="loop")
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(delta, ref_delta)
    inputs = [x, start, *level.parameters()]
    grads = torch.autograd.grad(out.square().sum() + delta.square().sum(), inputs)
    ref_grads = torch.autograd.grad(ref_out.square().sum() + ref_delta.square().sum(), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_an_unknown_in_context_impl_names_the_choices():
    with pytest.raises(ValueError, match="impl must be 'solve' or 'loop', got 'fast'"):
        make_level().forward_in_context(torch.zeros(1, 4, 8, dtype=torch.float64), 1, 0.05, impl="fast")


def test_fast_weights_change_only_at_chunk_boundaries():
    level, period = make_level(), 4
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    changed = x.clone()
    changed[0, 5] += 1.0  # a token inside the second chunk (tokens 4..7)
    with torch.no_grad():
        out, _ = level.forward_in_context(x, period, lr=0.05)
        out_changed, _ = level.forward_in_context(changed, period, lr=0.05)
    same = [t for t in range(12) if t != 5 and t < 8]
    torch.testing.assert_close(out[0, same], out_changed[0, same])  # the delta is fixed inside a chunk
    assert not torch.allclose(out[0, 8:], out_changed[0, 8:])  # the next chunk sees the update


def test_final_partial_chunk_is_flushed_into_the_state():
    level = make_level()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    _, delta_short = level.forward_in_context(x, period=16, lr=0.05)  # shorter than one chunk
    assert delta_short.abs().sum() > 0


def test_context_periods_need_one_entry_per_level():
    with pytest.raises(ValueError, match="one entry per CMS level"):
        ContinuumMemory(8, 16, periods=(1, 4, 16), context_periods=(1, 16))


def test_in_context_cms_is_causal_inside_hope():
    from nl_lightning.models import Hope

    torch.manual_seed(0)
    model = Hope("tiny", overrides={"n_layer": 1, "cms_in_context": True, "cms_periods": [1, 1, 4, 16],
                                    "cms_context_periods": [1, 4, 8, 16], "chunk_size": 8, "proj_chunk_size": 8}).eval()
    tokens = torch.randint(0, 256, (1, 40))
    changed = tokens.clone()
    changed[0, 30] = (changed[0, 30] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, :30], model(changed)[:, :30])
