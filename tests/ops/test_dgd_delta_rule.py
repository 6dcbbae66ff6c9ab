"""The delta write rule of the DGD memory ops (``ops/dgd/naive.py``): every implementation against
the token loop, the one-shot write it exists for, and its stability bound on adversarial input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ops.test_dgd import D, DH, F64, H, T, assert_same_run, make_inputs

from nl_lightning.ops.activations import silu_grad
from nl_lightning.ops import MemoryState
from nl_lightning.ops.dgd import dgd_memory
from nl_lightning.ops.dgd.common import NLMS_EPS
from nl_lightning.ops.dgd.naive import w2_error_scale

RULES = [("delta", "value"), ("delta", "self")]


def delta_inputs(kind, *, batch=2, length=T, seed=0, device="cpu"):
    """``make_inputs`` with β drawn over all of (0, 1) (one-shot steps included) instead of DGD's small η."""
    seq, weights = make_inputs(kind, batch=batch, length=length, seed=seed, device=device)
    with torch.no_grad():
        seq["eta"].uniform_(0.05, 1.0)
    return seq, weights


def run_with_grads(seq, weights, **options):
    o, state = dgd_memory(**seq, weights=weights, **options)
    gen = torch.Generator().manual_seed(123)
    weights_of_loss = [torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) for x in (o, *state.weights)]
    loss = sum((x * w).sum() for x, w in zip((o, *state.weights), weights_of_loss))
    return o, state, torch.autograd.grad(loss, [*seq.values(), *weights])


@pytest.mark.parametrize(("rule", "target"), RULES, ids=["value", "self"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, T, 16], ids=["online", "C3", "C4", "C=T", "C>T"])
def test_chunk_and_cpu_match_naive_forward_and_grads_float64(kind, chunk_size, rule, target):
    seq, weights = delta_inputs(kind, batch=3)  # 3·H items: more than one per thread in the C++ loop
    options = dict(kind=kind, chunk_size=chunk_size, rule=rule, target=target)
    expected = run_with_grads(seq, weights, impl="naive", **options)
    assert_same_run(run_with_grads(seq, weights, impl="chunk", **options), expected, **F64)
    if kind == "mlp":
        assert_same_run(run_with_grads(seq, weights, impl="cpu", **options), expected, **F64)


def assert_close_to_scale(actual, expected, rel):
    """Every output and gradient within ``rel`` of the largest entry of its reference: float32 at
    model sizes, where the gradients reach 1e3 and rounding scales with them."""
    (o_a, state_a, grads_a), (o_e, state_e, grads_e) = actual, expected
    for a, e in zip((o_a, *state_a.weights, *grads_a), (o_e, *state_e.weights, *grads_e)):
        assert (a - e).abs().max() <= rel * e.abs().max(), ((a - e).abs().max(), e.abs().max())


@pytest.mark.parametrize("target", ["value", "self"])
def test_cpu_matches_chunk_float32_at_model_sizes(target):
    from tests.ops.test_dgd import model_size_inputs

    seq, weights = model_size_inputs(batch=2, hidden=48)
    with torch.no_grad():
        seq["eta"].uniform_(0.05, 0.5)
    options = dict(kind="mlp", chunk_size=64, rule="delta", target=target)
    expected = run_with_grads(seq, weights, impl="chunk", **options)
    assert_close_to_scale(run_with_grads(seq, weights, impl="cpu", **options), expected, rel=1e-5)


def test_cpu_is_as_accurate_as_chunk_in_float32_at_one_shot_steps():
    """β up to 1 with 64 keys in 48 dimensions: the UT systems are badly conditioned and every
    float32 implementation, the token loop included, is ~1e-3 off the float64 result; the C++ kernel
    must not be worse than the ATen one."""
    from tests.ops.test_dgd import model_size_inputs

    seq, weights = model_size_inputs(batch=2, hidden=48)
    seq, weights = {n: x.detach() for n, x in seq.items()}, tuple(w.detach() for w in weights)
    seq["eta"].uniform_(0.05, 1.0)
    options = dict(kind="mlp", chunk_size=64, rule="delta", target="value")
    exact, _ = dgd_memory(**{n: x.double() for n, x in seq.items()}, weights=tuple(w.double() for w in weights),
                          impl="chunk", **options)
    errors = {impl: (dgd_memory(**seq, weights=weights, impl=impl, **options)[0].double() - exact).abs().max()
              for impl in ("chunk", "cpu")}
    assert errors["cpu"] <= 2 * errors["chunk"] + 1e-5, errors


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_implements_the_delta_rule():
    seq, weights = make_inputs("linear", dtype=torch.float32)
    options = dict(kind="linear", chunk_size=4, rule="delta", target="value")
    expected = run_with_grads(seq, weights, impl="chunk", **options)
    assert_same_run(run_with_grads(seq, weights, impl="compiled", **options), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("rule", "target"), [*RULES, ("dgd", "value")], ids=["delta-value", "delta-self", "dgd-value"])
@pytest.mark.parametrize("chunk_size", [1, 3, T, 16], ids=["online", "C3", "C=T", "C>T"])
def test_triton_matches_naive_forward_and_grads_float64(triton_device, chunk_size, rule, target):
    """The Triton kernels' delta rule and value target (hand-written backward; the interpreter on a
    machine without a GPU) against the token loop; ("dgd", "self") is in test_dgd.py."""
    seq, weights = delta_inputs("mlp", device=triton_device)
    options = dict(kind="mlp", chunk_size=chunk_size, rule=rule, target=target)
    expected = run_with_grads(seq, weights, impl="naive", **options)
    assert_same_run(run_with_grads(seq, weights, impl="triton", **options), expected, **F64)


@pytest.mark.parametrize("target", ["value", "self"])
def test_triton_matches_chunk_float32_at_model_sizes(triton_device, target):
    """float32 at HOPE-tiny's head size (48, padded to a 64-wide tile), chunks of 64 and a partial
    one, one-shot gates: the Triton delta rule against the ATen chunk kernel."""
    from tests.ops.test_dgd import model_size_inputs

    seq, weights = model_size_inputs(batch=1, hidden=48, device=triton_device)
    with torch.no_grad():
        seq["eta"].uniform_(0.05, 0.5)
    options = dict(kind="mlp", chunk_size=64, rule="delta", target=target)
    expected = run_with_grads(seq, weights, impl="chunk", **options)
    assert_close_to_scale(run_with_grads(seq, weights, impl="triton", **options), expected, rel=1e-5)


@pytest.mark.parametrize(("option", "value"), [("rule", "nlms"), ("target", "key")])
def test_unknown_rule_or_target_is_refused_naming_the_choices(option, value):
    seq, weights = make_inputs("linear")
    with pytest.raises(ValueError, match=rf"{option}='{value}'.*use one of"):
        dgd_memory(**seq, weights=weights, kind="linear", chunk_size=4, **{option: value})


@pytest.mark.parametrize("impl", ["naive", "chunk"])
@pytest.mark.parametrize("chunk_size", [1, 8])
def test_linear_memory_stores_an_association_in_one_token(impl, chunk_size):
    """β = α = 1, unit keys: after writing (k, v), W k = v whatever was stored before and wherever
    the token sits in its chunk (the linear delta rule is exact at every chunk size)."""
    seq, weights = make_inputs("linear", batch=1, length=8)
    seq = {n: x.detach() for n, x in seq.items()}
    seq["eta"].fill_(1.0)
    seq["alpha"].fill_(1.0)
    seq["q"] = seq["k"].clone()  # read each key right after its write
    options = dict(kind="linear", chunk_size=chunk_size, impl=impl, rule="delta", target="value")
    o, _ = dgd_memory(**seq, weights=weights, **options)
    for t in range(8):
        if t == 0:
            (w,) = (x.expand(1, *x.shape) for x in weights)
        else:
            _, ((w,), _) = dgd_memory(**{n: x[:, :, :t] for n, x in seq.items()}, weights=weights, **options)
        k, v = seq["k"][:, :, t], seq["v"][:, :, t]
        before = (w.detach() @ k[..., None]).squeeze(-1)  # W_{t-1} k_t
        # y = (1 - β') W k + β' v with β' = |k|²/(|k|² + ε) = 1 - 1e-3: the error shrinks a thousandfold.
        kept = (NLMS_EPS / (k.pow(2).sum(-1) + NLMS_EPS))[..., None]
        torch.testing.assert_close(o[:, :, t], (1 - kept) * v + kept * before, **F64)
        assert ((o[:, :, t] - v).norm(dim=-1) < 2e-3 * (before - v).norm(dim=-1)).all()


def test_mlp_memory_one_token_write_removes_most_of_the_error():
    """β = α = 1: W1's write makes M(k) = v up to ε; W2 corrects only what is left, so one token
    leaves a few percent of the error at most."""
    seq, weights = make_inputs("mlp", batch=4, length=1, seed=3)
    seq = {n: x.detach() for n, x in seq.items()}
    seq["eta"].fill_(1.0)
    seq["alpha"].fill_(1.0)
    seq["q"] = seq["k"].clone()
    w1, w2 = (w.detach() for w in weights)
    k = seq["k"]
    before = k + F.silu(k @ w2.mT) @ w1.mT
    o, _ = dgd_memory(**seq, weights=(w1, w2), kind="mlp", chunk_size=1, impl="naive", rule="delta", target="value")
    ratio = (o - seq["v"]).norm(dim=-1) / (before - seq["v"]).norm(dim=-1)
    assert ratio.max() < 0.05, ratio  # measured: 0.003-0.04; 1.45 before W2 took only the remaining error


# -- the stability bound ------------------------------------------------------------------------


def layer_terms(kind, state, k, v, beta, target):
    """Per layer (state order) the inputs x, and the writes' vectors y - g at the chunk start
    (``naive.py``), for one chunk's keys and values (B, H, L, D) and steps β (B, H, L)."""
    if kind == "linear":
        (w,) = state
        goal = v @ w.mT if target == "self" else v
        return [(k, goal)]
    w1, w2 = state
    pre = k @ w2.mT
    hidden = F.silu(pre)
    hidden_w1 = hidden @ w1.mT
    goal = v + F.silu(v @ w2.mT) @ w1.mT if target == "self" else v
    g1 = k + hidden_w1 - goal
    g2 = silu_grad(pre) * (g1 @ w1) * w2_error_scale(beta, hidden, pre, w1.pow(2).sum(-2).unsqueeze(-2))[..., None]
    return [(hidden, hidden_w1 - g1), (k, pre - g2)]


def run_with_bound(seq, weights, *, kind, chunk_size, target, impl="chunk"):
    """Run a chunk per call and return the final state and, per layer, the documented bound
    ||W_t|| <= rho_t ||W_{t-1}|| + eta ||y - g|| ||x|| followed token by token (B, H)."""
    batch = seq["q"].shape[0]
    state = MemoryState(tuple(w.expand(batch, *w.shape) for w in weights))
    bounds = [w.flatten(-2).norm(dim=-1).expand(batch, -1) for w in weights]
    for start in range(0, seq["q"].shape[2], chunk_size):
        part = {n: x[:, :, start : start + chunk_size] for n, x in seq.items()}
        terms = layer_terms(kind, state.weights, part["k"], part["v"], part["eta"], target)
        for t in range(part["q"].shape[2]):
            beta, alpha = part["eta"][:, :, t], part["alpha"][:, :, t]
            for i, (x, u) in enumerate(terms):
                norm = x[:, :, t].pow(2).sum(-1)
                eta = beta / (norm + NLMS_EPS)
                rho = torch.maximum(alpha, (alpha - eta * norm).abs())
                bounds[i] = rho * bounds[i] + eta * u[:, :, t].norm(dim=-1) * norm.sqrt()
        _, state = dgd_memory(**part, state=state, kind=kind, chunk_size=chunk_size, impl=impl, rule="delta",
                              target=target)
    return state.weights, bounds


def adversarial_inputs(case, kind, length, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    shape = (1, H, length, D)
    q = torch.randn(*shape, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(*shape, generator=gen, dtype=dtype)
    beta = torch.ones(shape[:3], dtype=dtype)  # one-shot steps everywhere
    alpha = torch.ones(shape[:3], dtype=dtype)  # and nothing forgotten
    if case == "repeated-key":
        k = k[:, :, :1].expand(shape).contiguous()
        v = 10 * v
    elif case == "large-norm":
        k, v, q = 1e3 * k, 1e3 * v, 1e3 * q
    elif case == "random-gates":
        beta = torch.rand(shape[:3], generator=gen, dtype=dtype)
        alpha = 0.9 + 0.1 * torch.rand(shape[:3], generator=gen, dtype=dtype)
    gen_w = torch.Generator().manual_seed(8)
    if kind == "linear":
        weights = (0.3 * torch.randn(H, D, D, generator=gen_w, dtype=dtype),)
    else:
        weights = (0.1 * torch.randn(H, D, DH, generator=gen_w, dtype=dtype),
                   torch.randn(H, DH, D, generator=gen_w, dtype=dtype) / D**0.5)
    return {"q": q, "k": k, "v": v, "eta": beta, "alpha": alpha}, weights


@pytest.mark.parametrize("case", ["repeated-key", "large-norm", "random-gates"])
@pytest.mark.parametrize(("kind", "impl"), [("linear", "chunk"), ("mlp", "chunk"), ("mlp", "cpu")])
def test_state_stays_finite_and_within_the_documented_bound(case, kind, impl):
    seq, weights = adversarial_inputs(case, kind, length=256)
    state, bounds = run_with_bound(seq, weights, kind=kind, chunk_size=16, target="value", impl=impl)
    for w, bound in zip(state, bounds):
        norm = w.flatten(-2).norm(dim=-1)
        assert torch.isfinite(w).all()
        assert (norm <= bound * (1 + 1e-9)).all(), (norm, bound)


@pytest.mark.parametrize("beta", [0.25, 0.5, 0.9])
def test_mlp_inner_layer_stays_small_under_chunking_on_random_associations(beta):
    """Without the curvature normalisation of W2's error, W2 grew to 2.7e4 here (C = 64, β = 0.5;
    23 at C = 1): chunk-stale errors pushed it along directions the output barely depends on."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 4, 1024, 48)
    q, k = (F.normalize(torch.randn(*shape, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(*shape, generator=gen)
    weights = (0.1 * torch.randn(4, 48, 48, generator=gen) / 48**0.5, torch.randn(4, 48, 48, generator=gen) / 48**0.5)
    for chunk_size in (8, 64):
        o, ((w1, w2), _) = dgd_memory(q, k, v, torch.full(shape[:3], beta), torch.ones(shape[:3]), weights, kind="mlp",
                                 chunk_size=chunk_size, impl="auto", rule="delta", target="value")
        assert w2.flatten(-2).norm(dim=-1).max() < 20  # measured 6.6-7.8 (it starts at 6.9)
        assert o.abs().max() < 20


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_16k_tokens_of_one_shot_writes_stay_within_the_bound(kind):
    """16K tokens, β = α = 1, a few keys repeated in a loop (the state never forgets and every
    token writes in full): float32 as the models run it, the bound followed token by token."""
    seq, weights = adversarial_inputs("random-keys", kind, length=16384, dtype=torch.float32)
    seq["k"] = seq["k"][:, :, :5].repeat(1, 1, 16384 // 5 + 1, 1)[:, :, :16384].contiguous()
    state, bounds = run_with_bound(seq, weights, kind=kind, chunk_size=64, target="value", impl="auto")
    for w, bound in zip(state, bounds):
        norm = w.flatten(-2).norm(dim=-1)
        assert torch.isfinite(w).all()
        assert (norm <= bound * (1 + 1e-4)).all(), (norm, bound)
    # and the state is far from the worst case that sums every write: repeated keys are overwritten
    assert max(w.flatten(-2).norm(dim=-1).max() for w in state) < 100
