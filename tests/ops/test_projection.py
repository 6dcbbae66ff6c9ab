"""HOPE's self-modifying projection memories as an op (``nl_lightning.ops.projection``): every
implementation against the reference loop, both write rules, forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import on_one_and_two_threads
from tests.ops.test_dgd import B, DH, F64, T, make_inputs

from nl_lightning.ops import MemoryState, memory_read
from nl_lightning.ops.dgd import dgd_memory
from nl_lightning.ops.projection import projection_memories
from nl_lightning.ops.projection.chunk import _shared_key_write
from nl_lightning.ops.projection.naive import read_memories
from nl_lightning.ops.projection.shared_key import shared_key_mlp_update

DIM, HIDDEN = 16, 8
ETA_SCALE = {"dgd": 0.5 / 4, "delta": 1.0}  # the paper rule's cap over the chunk; the delta rule's β = σ


def projection_inputs(batch=3, length=14, dim=DIM, hidden=HIDDEN, dtype=torch.float64, seed=0):
    """Unit-norm inputs (HOPE normalises them), initial weights at HOPE's scale, gate biases."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, length, dim, generator=gen, dtype=dtype), dim=-1).requires_grad_()
    weights = (
        (0.1 * torch.randn(4, dim, hidden, generator=gen, dtype=dtype) / hidden**0.5).requires_grad_(),
        (torch.randn(4, hidden, dim, generator=gen, dtype=dtype) / dim**0.5).requires_grad_(),
    )
    bias = torch.tensor([0.0, 2.0], dtype=dtype, requires_grad=True)
    return x, weights, bias


def run(impl, x, weights, bias, *, chunk_size, rule):
    """Read-outs and the gradients of a fixed random projection of them w.r.t. every input (zeros
    where nothing depends on an input: a single chunk writes nothing, so the biases get none)."""
    out = projection_memories(x, weights, bias, chunk_size=chunk_size, eta_scale=ETA_SCALE[rule], rule=rule, impl=impl)
    gen = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    return [out, *torch.autograd.grad(loss, [x, *weights, bias], allow_unused=True, materialize_grads=True)]


NAMES = ["read-outs", "grad x", "grad W1", "grad W2", "grad gate biases"]


def test_read_memories_matches_the_residual_mlp_per_memory():
    """The loop's read-out (one stacked W2 matmul for the four memories) equals ``memory_read`` per
    memory on a broadcast chunk, forward and gradients (float64)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    _, weights, _ = projection_inputs()
    state = tuple((w.detach() + 0.1 * torch.randn(3, *w.shape, generator=gen, dtype=w.dtype)).requires_grad_()
                  for w in weights)
    fast, reference = read_memories(state, z), memory_read("mlp", state, z[:, None])
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    weight = torch.randn(fast.shape, generator=gen, dtype=fast.dtype)
    grads = [torch.autograd.grad((out * weight).sum(), (z, *state)) for out in (fast, reference)]
    for name, a, e in zip(["z", "W1", "W2"], *grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("rule", ["dgd", "delta"])
@pytest.mark.parametrize("impl", ["chunk", "cpu"])
@pytest.mark.parametrize(
    ("length", "chunk_size"), [(14, 4), (4, 4), (3, 8), (9, 1)], ids=["partial-last", "one-chunk", "short", "online"]
)
def test_matches_the_reference_loop_forward_and_grads_float64(impl, rule, length, chunk_size):
    """Under the DGD rule ``cpu`` is ``projection_cpu.cpp`` (reads, gates, key normalisation, decays,
    updates, hand-written backward) and ``chunk`` the shared-key kernel; under the delta rule both
    write through the DGD op's kernels."""
    x, weights, bias = projection_inputs(length=length)
    expected = run("naive", x, weights, bias, chunk_size=chunk_size, rule=rule)
    actual = run(impl, x, weights, bias, chunk_size=chunk_size, rule=rule)
    for name, a, e in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    if length > chunk_size:  # later chunks read written memories: the gate biases matter
        assert actual[-1].abs().max() > 0


def test_compiled_runs_the_chunk_path():
    x, weights, bias = projection_inputs()
    expected = run("chunk", x, weights, bias, chunk_size=4, rule="dgd")
    for a, e in zip(run("compiled", x, weights, bias, chunk_size=4, rule="dgd"), expected):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_cpu_loop_gives_identical_results_on_one_and_two_threads():
    """One batch element per thread with its own scratch: the thread count must not change a bit."""
    x, weights, bias = projection_inputs(dtype=torch.float32)
    runs = on_one_and_two_threads(lambda: run("cpu", x, weights, bias, chunk_size=4, rule="dgd"))
    for a, e in zip(runs[1], runs[0]):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


@pytest.mark.parametrize("rule", ["dgd", "delta"])
def test_cpu_matches_chunk_float32_at_tiny_size(rule):
    x, weights, bias = projection_inputs(batch=2, length=150, dim=192, hidden=48, dtype=torch.float32)
    expected = run("chunk", x, weights, bias, chunk_size=64, rule=rule)
    for a, e in zip(run("cpu", x, weights, bias, chunk_size=64, rule=rule), expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def _shared_stream(memories=3, length=T, dtype=torch.float64):
    """One key/value/gate stream and M mlp memories at their chunk start, as HOPE's projections."""
    seq, _ = make_inputs("mlp", length=length, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    shared = {name: x.detach()[:, 0].clone().requires_grad_() for name, x in seq.items() if name != "q"}
    state = tuple(
        (0.3 * torch.randn(B, memories, *shape, generator=gen, dtype=dtype)).requires_grad_()
        for shape in ((seq["k"].shape[-1], DH), (DH, seq["k"].shape[-1]))
    )
    return shared, state


@pytest.mark.parametrize("length", [1, 4, T])
def test_shared_key_update_matches_naive_per_memory_forward_and_grads_float64(length):
    shared, state = _shared_stream(length=length)
    inputs = [*shared.values(), *state]
    memories = state[0].shape[1]
    k, v = (shared[n][:, None].expand(-1, memories, -1, -1) for n in "kv")
    eta, alpha = (shared[n][:, None].expand(-1, memories, -1) for n in ("eta", "alpha"))
    # The reference: the memories as heads of the token-by-token kernel, one chunk of L tokens.
    _, expected = dgd_memory(
        k, k, v, eta, alpha, state=MemoryState(state), kind="mlp", chunk_size=length, impl="naive"
    )
    actual = shared_key_mlp_update(shared["k"], shared["v"], shared["eta"], shared["alpha"], state)
    gen = torch.Generator().manual_seed(123)
    weights = [torch.randn(s.shape, generator=gen, dtype=s.dtype) for s in expected.weights]
    grads = [
        torch.autograd.grad(sum((s * w).sum() for s, w in zip(out, weights)), inputs)
        for out in (actual, expected.weights)
    ]
    for a, e in zip(actual, expected.weights):
        torch.testing.assert_close(a, e, **F64)
    for name, a, e in zip(["k", "v", "eta", "alpha", "W1", "W2"], *grads):
        torch.testing.assert_close(a, e, **F64, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_chunk_writes_under_autocast_take_mixed_dtypes_and_compute_in_float32():
    shared, state = _shared_stream(dtype=torch.float32)
    key, value = shared["k"].detach(), shared["v"].detach()
    state = tuple(s.detach() for s in state)
    args = (shared["eta"].detach(), shared["alpha"].detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _shared_key_write(state, key.bfloat16(), value.bfloat16(), None, *args, "dgd")
    expected = _shared_key_write(state, key.bfloat16().float(), value.bfloat16().float(), None, *args, "dgd")
    for a, e in zip(mixed, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, atol=0, rtol=0)


def _bad_calls():
    x, weights, bias = (t.detach() if isinstance(t, torch.Tensor) else tuple(w.detach() for w in t)
                        for t in projection_inputs())
    ok = dict(x=x, weights=weights, gate_bias=bias, chunk_size=4, eta_scale=1.0, rule="delta")
    return [
        ("x-2d", dict(ok, x=x[0]), r"x must be \(B, T, D\)"),
        ("weights-count", dict(ok, weights=weights[:1]), r"weights must be \(W1, W2\)"),
        ("weights-width", dict(ok, weights=(weights[0][:, :4], weights[1])), r"4 memories, D=16"),
        ("three-memories", dict(ok, weights=(weights[0][:3], weights[1][:3])), r"4 memories"),
        ("gate-bias", dict(ok, gate_bias=bias[:1]), r"gate_bias must be \(2,\)"),
        ("rule", dict(ok, rule="paper"), "rule='paper'"),
        ("chunk", dict(ok, chunk_size=0), "chunk_size=0"),
        ("impl", dict(ok, impl="cuda"), "impl='cuda'"),
    ]


@pytest.mark.parametrize(("case", "kwargs", "message"), _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise_value_error_naming_the_value(case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        projection_memories(**kwargs)
