"""Titans memory (SPEC §2): chunk, compiled, fused CPU and Triton kernels against the token-by-token
reference."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ON_DEVICES, as_leaves, on_one_and_two_threads

from nl_lightning.ops import memory_read
from nl_lightning.ops.titans import MemoryState, titans_memory
from nl_lightning.ops.titans.chunk import _LinearHandOver, linear_chunk_step
from nl_lightning.ops.titans.coefficients import chunk_coefficients
from nl_lightning.ops.titans.common import loss_grad_factors

B, H, T, D, DH = 2, 2, 11, 4, 6
F64 = dict(atol=1e-10, rtol=1e-10)
CHUNKS = pytest.mark.parametrize("chunk_size", [1, 4, T], ids=["online", "C4-not-dividing-T", "C=T"])
KINDS = pytest.mark.parametrize("kind", ["linear", "mlp"])
# Every implementation that runs on the CPU without Triton, with the memory kinds it supports.
KIND_IMPLS = pytest.mark.parametrize(
    ("kind", "impl"),
    [("linear", "naive"), ("linear", "chunk"), ("linear", "cpu"), ("mlp", "naive"), ("mlp", "chunk"),
     ("mlp", "cpu")],
)
GATES = ("theta", "eta", "alpha")


def impl(name):
    """``titans_memory`` through implementation ``name`` (the entry point validates and upcasts)."""
    return functools.partial(titans_memory, impl=name)


naive, chunk, compiled, cpu = impl("naive"), impl("chunk"), impl("compiled"), impl("cpu")


def make_inputs(kind, *, batch=B, length=T, dtype=torch.float64, seed=0, device="cpu", dv=D, dk=D):
    """Inputs in the regime a Titans layer produces: unit-norm keys, gates strictly in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    def gate(low, high):
        return low + (high - low) * torch.rand(batch, H, length, generator=gen, dtype=dtype)

    seq = {
        "q": randn(batch, H, length, dk),
        "k": F.normalize(randn(batch, H, length, dk), dim=-1),
        "v": randn(batch, H, length, dv, scale=0.5),
        "theta": gate(0.05, 0.3),
        "eta": gate(0.1, 0.9),
        "alpha": gate(0.01, 0.3),
    }
    if kind == "linear":
        weights = (randn(H, dv, dk, scale=0.3),)
    else:
        weights = (randn(H, dv, DH, scale=0.3), randn(H, DH, D, scale=0.3))
    return as_leaves(seq, weights, device)


def run_with_grads(fn, seq, weights, **kwargs):
    """Forward, then gradients of a fixed random projection of (y, final state) w.r.t. every input."""
    y, state = fn(**seq, weights=weights, **kwargs)
    outputs = (y, *state.weights, *state.momentum)
    gen = torch.Generator().manual_seed(123)
    # Drawn in float64 whatever the outputs' dtype, so runs in two precisions share the projection.
    projection = (torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype) for x in outputs)
    loss = sum((x * p).sum() for x, p in zip(outputs, projection))
    grads = torch.autograd.grad(loss, [*seq.values(), *weights])
    return outputs, grads


def assert_same_run(actual, expected, **tol):
    (out_a, grads_a), (out_e, grads_e) = actual, expected
    out_names = ["y"] + [f"state[{i}]" for i in range(len(out_e) - 1)]
    for name, a, e in zip(out_names, out_a, out_e):
        torch.testing.assert_close(a, e, **tol, msg=lambda m, name=name: f"{name}: {m}")
    names = ["q", "k", "v", *GATES] + [f"weights[{i}]" for i in range(len(grads_e) - 6)]
    for name, a, e in zip(names, grads_a, grads_e):
        torch.testing.assert_close(a, e, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


@KINDS
def test_explicit_memory_gradient_equals_autograd_of_squared_error(kind):
    seq, weights = make_inputs(kind, batch=1, length=3)
    ws = [w.detach().unsqueeze(0).requires_grad_() for w in weights]
    k, v = seq["k"].detach(), seq["v"].detach()
    loss = (memory_read(kind, ws, k) - v).square().sum()
    expected = torch.autograd.grad(loss, ws)
    explicit = [(u.mT @ x) for u, x in loss_grad_factors(kind, ws, k, v)]  # summed over tokens
    for e, g in zip(expected, explicit):
        torch.testing.assert_close(g, e, **F64)


@ON_DEVICES
@KINDS
@pytest.mark.parametrize("chunk_size", [1, 4, T, 16], ids=["online", "C4-not-dividing-T", "C=T", "C>T"])
def test_chunk_matches_naive_forward_and_grads_float64(kind, chunk_size, device):
    seq, weights = make_inputs(kind, device=device)
    expected = run_with_grads(naive, seq, weights, kind=kind, chunk_size=chunk_size)
    actual = run_with_grads(chunk, seq, weights, kind=kind, chunk_size=chunk_size)
    assert_same_run(actual, expected, **F64)


def test_chunk_matches_naive_with_different_key_and_value_widths():
    seq, weights = make_inputs("linear", dv=3)
    expected = run_with_grads(naive, seq, weights, kind="linear", chunk_size=4)
    actual = run_with_grads(chunk, seq, weights, kind="linear", chunk_size=4)
    assert_same_run(actual, expected, **F64)


def test_chunk_stays_finite_and_exact_under_strong_forgetting():
    # Cumulative products of (1 - alpha) and eta underflow float32 inside a 64-token chunk; a
    # kernel that divides cumulative products would produce 0/0 here.
    seq, weights = make_inputs("linear", length=64)
    with torch.no_grad():
        seq["alpha"].fill_(0.9)
        seq["eta"].fill_(1e-3)
    expected = run_with_grads(naive, seq, weights, kind="linear", chunk_size=64)
    assert_same_run(run_with_grads(chunk, seq, weights, kind="linear", chunk_size=64), expected, **F64)
    seq32 = {n: x.detach().float().requires_grad_() for n, x in seq.items()}
    weights32 = [w.detach().float().requires_grad_() for w in weights]
    outputs, grads = run_with_grads(chunk, seq32, weights32, kind="linear", chunk_size=64)
    assert all(torch.isfinite(x).all() for x in (*outputs, *grads))


@KINDS
def test_chunk_matches_naive_when_gates_reach_zero_or_one(kind):
    # eta = 0 wipes the momentum and alpha = 1 wipes the memory: zero factors inside the chunk's
    # cumulative products, where a ratio of cumulative products would be 0/0.
    seq, weights = make_inputs(kind)
    with torch.no_grad():
        seq["eta"][:, :, [2, 6]] = 0.0
        seq["alpha"][:, :, [5, 6]] = 1.0
    expected = run_with_grads(naive, seq, weights, kind=kind, chunk_size=4)
    actual = run_with_grads(chunk, seq, weights, kind=kind, chunk_size=4)
    assert_same_run(actual, expected, **F64)


def test_coefficient_gradients_match_finite_differences_with_saturated_gates():
    # The coefficients' backward is written out (no division, so exact at a zero factor); check
    # it against finite differences with gates at exactly 0 and 1, two chunks, the second partial.
    gen = torch.Generator().manual_seed(0)
    theta, eta, alpha = (torch.rand(1, 2, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    eta[0, 0, [1, 5]], eta[0, 1, 2] = 0.0, 1.0
    alpha[0, 0, 2], alpha[0, 1, [1, 6]] = 1.0, 0.0
    theta[0, 1, 3] = 0.0
    gates = [g.requires_grad_() for g in (theta, eta, alpha)]
    assert torch.autograd.gradcheck(lambda *g: tuple(chunk_coefficients(*g, 4)), gates)


def test_decay_mix_scan_equals_the_sum_of_segment_products():
    # The row scan P_i = keep_i P_{i-1} + E_i must reproduce the definition
    # P_ij = sum_{j<=m<=i} prod_{m<l<=i} keep_l * prod_{j<l<=m} eta_l, zeros above the diagonal,
    # also with gates of exactly 0 and 1 (one chunk of 6 tokens).
    gen = torch.Generator().manual_seed(0)
    theta, eta, alpha = (torch.rand(1, 1, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    eta[0, 0, 2], alpha[0, 0, 4], alpha[0, 0, 1] = 0.0, 1.0, 0.0
    keep = 1 - alpha

    def prod(gate, lo, hi):  # prod_{lo < l <= hi} gate_l
        return torch.prod(gate[0, 0, lo + 1 : hi + 1])

    expected = torch.zeros(6, 6, dtype=torch.float64)
    for i in range(6):
        for j in range(i + 1):
            expected[i, j] = sum(prod(keep, m, i) * prod(eta, j, m) for m in range(j, i + 1))
    coefficients = chunk_coefficients(theta, eta, alpha, 6)
    torch.testing.assert_close(coefficients.decay_mix[0, 0, 0], expected, **F64)
    torch.testing.assert_close(coefficients.mix()[0, 0, 0], expected * theta[0, 0], **F64)


def test_linear_hand_over_backward_matches_finite_differences():
    # The linear chunk loop's reverse pass is written out; check every output's gradient
    # (chunk-start states, half-gradients, final state) w.r.t. every input, 3 chunks.
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    BH, N, C, Dk, Dv = 2, 3, 2, 3, 2
    inputs = (
        randn(BH, Dv, Dk), randn(BH, Dv, Dk),  # W0, S0
        randn(BH, N, C, Dk), randn(BH, N, C, Dv),  # k, v
        randn(BH, N, C, Dk), randn(BH, N, C, Dk),  # minus_mix * k, minus_surprise * k
        randn(BH, N, 3, 1, 1),  # (beta_end, carry_end, momentum_end)
    )  # fmt: skip
    assert torch.autograd.gradcheck(lambda *t: _LinearHandOver.apply(*t, linear_chunk_step), inputs)


@KINDS
@pytest.mark.parametrize("impl", ["chunk", "cpu"])
def test_saturated_gates_give_finite_float32_grads_matching_naive(kind, impl):
    # Gates exactly at 0 or 1 all over a 64-token chunk (memory wiped, momentum frozen or
    # wiped, no write) in float32: every output and gradient is finite and agrees with the
    # token-by-token reference.
    seq, weights = make_inputs(kind, length=70, dtype=torch.float32)
    with torch.no_grad():
        seq["eta"][:, :, ::3] = 0.0
        seq["eta"][:, :, 1::5] = 1.0
        seq["alpha"][:, :, ::7] = 1.0
        seq["alpha"][:, :, 2::4] = 0.0
        seq["theta"][:, :, ::11] = 0.0
    expected = run_with_grads(naive, seq, weights, kind=kind, chunk_size=64)
    outputs, grads = run_with_grads(titans_memory, seq, weights, kind=kind, chunk_size=64, impl=impl)
    assert all(torch.isfinite(x).all() for x in (*outputs, *grads))
    assert_same_run((outputs, grads), expected, atol=1e-4, rtol=1e-3)


@ON_DEVICES
@KINDS
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor import
def test_compiled_matches_chunk_float32(kind, device):
    seq, weights = make_inputs(kind, length=13, dtype=torch.float32, device=device)
    expected = run_with_grads(chunk, seq, weights, kind=kind, chunk_size=4)
    actual = run_with_grads(compiled, seq, weights, kind=kind, chunk_size=4)
    assert_same_run(actual, expected, atol=1e-5, rtol=1e-4)


# --- the fused CPU kernels (ops/cpu/titans_chunks.cpp) -----------------------------------------------


@KINDS
@pytest.mark.parametrize(
    "chunk_size", [1, 4, 3, T, 16], ids=["online", "C4-not-dividing-T", "C3-not-dividing-T", "C=T", "C>T"]
)
def test_cpu_matches_naive_forward_and_grads_float64(kind, chunk_size):
    # MLP: hidden width 6 != head size 4; linear: value width 3 != key width 4.
    seq, weights = make_inputs(kind, dv=3 if kind == "linear" else D)
    expected = run_with_grads(naive, seq, weights, kind=kind, chunk_size=chunk_size)
    actual = run_with_grads(cpu, seq, weights, kind=kind, chunk_size=chunk_size)
    assert_same_run(actual, expected, **F64)


@KINDS
def test_cpu_matches_chunk_float32_at_layer_size(kind):
    # The Titans-tiny layer's head size (48) and chunk (64), a partial last chunk, the layer's gate
    # ranges (small θ, strong momentum); float32 against the float64 ATen chunk kernel.
    gen = torch.Generator().manual_seed(3)
    Bl, Hl, Tl, Dl = 2, 2, 150, 48
    seq = {
        "q": F.normalize(torch.randn(Bl, Hl, Tl, Dl, generator=gen, dtype=torch.float64), dim=-1),
        "k": F.normalize(torch.randn(Bl, Hl, Tl, Dl, generator=gen, dtype=torch.float64), dim=-1),
        "v": torch.randn(Bl, Hl, Tl, Dl, generator=gen, dtype=torch.float64),
        "theta": 0.01 * torch.rand(Bl, Hl, Tl, generator=gen, dtype=torch.float64),
        "eta": 0.8 + 0.19 * torch.rand(Bl, Hl, Tl, generator=gen, dtype=torch.float64),
        "alpha": 0.02 * torch.rand(Bl, Hl, Tl, generator=gen, dtype=torch.float64),
    }
    weights = (
        0.02 * torch.randn(Hl, Dl, Dl, generator=gen, dtype=torch.float64),
        torch.randn(Hl, Dl, Dl, generator=gen, dtype=torch.float64) / Dl**0.5,
    )[: 1 if kind == "linear" else 2]

    def leaves(dtype):
        return (
            {n: x.to(dtype).requires_grad_() for n, x in seq.items()},
            tuple(w.to(dtype).requires_grad_() for w in weights),
        )

    expected = run_with_grads(chunk, *leaves(torch.float64), kind=kind, chunk_size=64)
    actual = run_with_grads(cpu, *leaves(torch.float32), kind=kind, chunk_size=64)
    for a, e in zip((*actual[0], *actual[1]), (*expected[0], *expected[1])):
        scale = e.abs().max().item()
        assert (a.double() - e).abs().max().item() <= 1e-4 * max(scale, 1e-3)


@KINDS
def test_cpu_backward_matches_finite_differences(kind):
    seq, weights = make_inputs(kind, batch=1, length=7)
    names = list(seq)

    def fn(*xs):
        y, state = cpu(**dict(zip(names, xs[:6])), weights=xs[6:], kind=kind, chunk_size=3)
        return (y, *state.weights, *state.momentum)

    assert torch.autograd.gradcheck(fn, (*seq.values(), *weights))


@KINDS
def test_cpu_gradients_when_only_the_read_outs_are_used(kind):
    # The end state gets no gradient (None into the backward); the read-outs' gradients still match.
    seq, weights = make_inputs(kind)
    grads = {}
    for impl in ("chunk", "cpu"):
        y, _ = titans_memory(**seq, weights=weights, kind=kind, chunk_size=4, impl=impl)
        grads[impl] = torch.autograd.grad((y * y).sum(), [*seq.values(), *weights])
    for a, e in zip(grads["cpu"], grads["chunk"]):
        torch.testing.assert_close(a, e, **F64)


@KINDS
def test_cpu_gives_identical_results_on_one_and_two_threads(kind):
    """Each (batch, head) item runs start to end on one thread with that thread's own scratch, so
    the thread count must not change a single bit (a shared buffer would show up here)."""
    seq, weights = make_inputs(kind, batch=3, length=21, dtype=torch.float32)
    runs = on_one_and_two_threads(
        lambda: run_with_grads(cpu, seq, weights, kind=kind, chunk_size=4)
    )
    assert_same_run(runs[1], runs[0], atol=0, rtol=0)


def test_cpu_computes_half_precision_inputs_in_float32():
    seq, weights = make_inputs("mlp", dtype=torch.float32)
    half = {n: x.detach().bfloat16().requires_grad_() for n, x in seq.items()}
    half_weights = tuple(w.detach().bfloat16().requires_grad_() for w in weights)
    y, state = cpu(**half, weights=half_weights, kind="mlp", chunk_size=4)
    assert y.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for w in state.weights)
    y32, _ = cpu(
        **{n: x.detach().bfloat16().float() for n, x in seq.items()},
        weights=tuple(w.detach().bfloat16().float() for w in weights), kind="mlp", chunk_size=4,
    )
    torch.testing.assert_close(y.float(), y32, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in (*half.values(), *half_weights))


def test_cpu_refuses_tensors_off_the_cpu_naming_the_fix():
    seq, weights = make_inputs("linear")
    seq = {n: x.detach().to("meta") for n, x in seq.items()}
    weights = tuple(w.detach().to("meta") for w in weights)
    with pytest.raises(ValueError, match="CPU tensors.*impl='chunk'"):
        cpu(**seq, weights=weights, kind="linear", chunk_size=4)


def _count_impls(monkeypatch):
    from nl_lightning.ops import titans

    calls = {"cpu": 0, "chunk": 0}
    for name in calls:
        def counted(*args, _original=titans._FUNCTIONS[name], _impl=name, **kwargs):
            calls[_impl] += 1
            return _original(*args, **kwargs)

        monkeypatch.setitem(titans._FUNCTIONS, name, counted)
    return calls


@KINDS
def test_auto_uses_the_fused_kernel_on_cpu_and_aten_under_a_dispatch_mode(monkeypatch, kind):
    from torch.utils.flop_counter import FlopCounterMode

    calls = _count_impls(monkeypatch)
    seq, weights = make_inputs(kind)
    titans_memory(**seq, weights=weights, kind=kind, chunk_size=4, impl="auto")
    assert calls == {"cpu": 1, "chunk": 0}
    with FlopCounterMode(display=False):  # a dispatch mode must see the ATen ops
        titans_memory(**seq, weights=weights, kind=kind, chunk_size=4, impl="auto")
    assert calls == {"cpu": 1, "chunk": 1}


def test_auto_falls_back_to_chunk_with_one_warning_when_the_kernels_cannot_build(
    monkeypatch, unbuildable_cpu_kernels
):
    import warnings

    calls = _count_impls(monkeypatch)
    seq, weights = make_inputs("mlp")
    with pytest.warns(RuntimeWarning, match="no compiler.*falls back to 'chunk'"):
        titans_memory(**seq, weights=weights, kind="mlp", chunk_size=4, impl="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        titans_memory(**seq, weights=weights, kind="mlp", chunk_size=4, impl="auto")
    assert calls == {"cpu": 0, "chunk": 2}


@CHUNKS
def test_triton_linear_matches_chunk_forward_and_grads(triton_linear, chunk_size):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq, weights = make_inputs("linear", dv=3)
    seq = {n: x.detach().to(device).requires_grad_() for n, x in seq.items()}
    weights = [w.detach().to(device).requires_grad_() for w in weights]
    expected = run_with_grads(chunk, seq, weights, kind="linear", chunk_size=chunk_size)
    actual = run_with_grads(triton_linear, seq, weights, kind="linear", chunk_size=chunk_size)
    assert_same_run(actual, expected, **F64)


@pytest.mark.parametrize("chunk_size", [64, 48], ids=["C64", "C48-not-dividing-T"])
def test_triton_linear_at_layer_size_in_float32_matches_the_float64_chunk_kernel(triton_linear, chunk_size):
    """A Titans-tiny head (48 wide: blocks padded to 64), several chunks and a partial last one, in
    float32: the kernel's IEEE float32 dots against the chunk kernel in float64. Longer on a GPU;
    the CPU interpreter keeps to three chunks."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    length = 1000 if device == "cuda" else 150
    seq, weights = make_inputs("linear", length=length, dk=48, dv=48, device=device)

    def run(fn, dtype):
        inputs = {n: x.detach().to(dtype).requires_grad_() for n, x in seq.items()}
        ws = [w.detach().to(dtype).requires_grad_() for w in weights]
        outputs, grads = run_with_grads(fn, inputs, ws, kind="linear", chunk_size=chunk_size)
        return [*outputs, *grads]

    expected = run(chunk, torch.float64)
    actual = run(triton_linear, torch.float32)
    names = ["y", "W", "S", "grad q", "grad k", "grad v", "grad theta", "grad eta", "grad alpha", "grad W0"]
    for name, a, e in zip(names, actual, expected, strict=True):
        error = ((a.double() - e).norm() / e.norm()).item()
        assert error < 1e-5, f"{name}: relative error {error:.2e} against float64"


def test_triton_linear_continues_from_a_passed_state(triton_linear):
    seq, weights = make_inputs("linear", length=12)
    y, state = chunk(**seq, weights=weights, kind="linear", chunk_size=4)
    _, mid = chunk(**{n: x[:, :, :8] for n, x in seq.items()}, weights=weights, kind="linear", chunk_size=4)
    y2, end = triton_linear(**{n: x[:, :, 8:] for n, x in seq.items()}, kind="linear", chunk_size=4, state=mid)
    torch.testing.assert_close(y2, y[:, :, 8:], **F64)
    for a, e in zip((*end.weights, *end.momentum), (*state.weights, *state.momentum)):
        torch.testing.assert_close(a, e, **F64)


def test_triton_kernels_compile_once_for_any_length_and_chunk_size():
    # Triton specialises ints that are 1 or multiples of 16 unless told not to; a new length or
    # chunk size would then recompile, and the backward kernel takes minutes to compile at
    # 64-wide blocks (on the H200 a C=48 test spent its whole time limit compiling).
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; install the dev extra to test the Triton kernel")
    from nl_lightning.ops.titans import triton as module

    for kernel in module._kernels(False):
        runtime = {p.name for p in kernel.params if p.do_not_specialize}
        assert {"N", "C", "DK", "DV"} <= runtime, (kernel.fn.__name__, runtime)


CUDA_COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nl_lightning.ops.titans import triton as module

options = module._launch_options(64, 32, 32)
blocks = {name: options.pop(name) for name in ("BLOCK_C", "BLOCK_DK", "BLOCK_DV")}
for kernel in module._kernels(False):
    names = kernel.arg_names
    n_pointers = names.index("N")
    signature = {n: "*fp32" if i < n_pointers else "constexpr" if n in blocks else "i32" for i, n in enumerate(names)}
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in blocks.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32), options=options)
    assert compiled.metadata.shared <= 163 * 1024, (kernel.__name__, compiled.metadata.shared)
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_cuda_within_a100_shared_memory():
    # No GPU is needed to run Triton's compiler down to a cubin; this catches what the
    # interpreter does not check (dot shapes, loop-carried types, shared-memory size). In a
    # subprocess because a process that imported Triton in interpreter mode cannot compile.
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; install the dev extra to test the Triton kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    result = subprocess.run([sys.executable, "-c", CUDA_COMPILE_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@KIND_IMPLS
def test_batch_elements_do_not_share_state(kind, impl):
    seq, weights = make_inputs(kind)
    y, _ = titans_memory(**seq, weights=weights, kind=kind, chunk_size=4, impl=impl)
    changed = {n: x.detach().clone() for n, x in seq.items()}
    changed["k"][1] = F.normalize(torch.randn_like(changed["k"][1]), dim=-1)
    changed["v"][1] += 1.0
    changed["theta"][1] = 0.5
    y_changed, _ = titans_memory(**changed, weights=weights, kind=kind, chunk_size=4, impl=impl)
    torch.testing.assert_close(y_changed[0], y[0], atol=0, rtol=0)
    assert not torch.allclose(y_changed[1], y[1])


@KIND_IMPLS
def test_read_out_is_causal(kind, impl):
    seq, weights = make_inputs(kind)
    t = 5  # inside the second chunk of 4, so a later token of the same chunk is perturbed
    y, _ = titans_memory(**seq, weights=weights, kind=kind, chunk_size=4, impl=impl)
    changed = {n: x.detach().clone() for n, x in seq.items()}
    for name in ("q", "k", "v", *GATES):
        changed[name][:, :, t + 1 :] = changed[name][:, :, t + 1 :].flip(2) * 0.5
    y_changed, _ = titans_memory(**changed, weights=weights, kind=kind, chunk_size=4, impl=impl)
    torch.testing.assert_close(y_changed[:, :, : t + 1], y[:, :, : t + 1], atol=0, rtol=0)
    assert not torch.allclose(y_changed[:, :, t + 1 :], y[:, :, t + 1 :])


@KIND_IMPLS
def test_sequence_shorter_than_chunk_updates_memory(kind, impl):
    seq, weights = make_inputs(kind, length=3)
    _, state = titans_memory(**seq, weights=weights, kind=kind, chunk_size=64, impl=impl)
    for start, end in zip(weights, state.weights):
        assert not torch.allclose(end, start.expand_as(end))
    assert all(s.abs().max() > 0 for s in state.momentum)


@KIND_IMPLS
def test_two_calls_with_state_passing_equal_one_call(kind, impl):
    seq, weights = make_inputs(kind, length=12)
    run = dict(kind=kind, chunk_size=4, impl=impl)
    y, state = titans_memory(**seq, weights=weights, **run)
    first = {n: x[:, :, :8] for n, x in seq.items()}  # split on a chunk boundary
    second = {n: x[:, :, 8:] for n, x in seq.items()}
    y1, mid = titans_memory(**first, weights=weights, **run)
    y2, end = titans_memory(**second, **run, state=mid)
    torch.testing.assert_close(torch.cat([y1, y2], dim=2), y, **F64)
    for a, e in zip((*end.weights, *end.momentum), (*state.weights, *state.momentum)):
        torch.testing.assert_close(a, e, **F64)
    # and gradients reach the slow weights through the handed-over state
    (grad,) = torch.autograd.grad(y2.sum(), weights[0])
    assert grad.abs().max() > 0


@KINDS
def test_dispatcher_runs_every_impl_with_one_contract(kind):
    seq, weights = make_inputs(kind)
    y_ref, _ = titans_memory(**seq, weights=weights, kind=kind, chunk_size=4, impl="naive")
    y, state = titans_memory(**seq, weights=weights, kind=kind, chunk_size=4)
    torch.testing.assert_close(y, y_ref, **F64)
    assert isinstance(state, MemoryState) and y.shape == (B, H, T, D)


def _bad(**changes):
    seq, weights = make_inputs("linear")
    args = dict(seq, weights=weights, kind="linear", chunk_size=4)
    args.update(changes)
    return args


BAD_INPUTS = {
    "unknown kind": (_bad(kind="gru"), "kind='gru'"),
    "unknown impl": (_bad(impl="cuda"), "impl='cuda'"),
    "zero chunk size": (_bad(chunk_size=0), "chunk_size=0"),
    "negative chunk size": (_bad(chunk_size=-2), "chunk_size=-2"),
    "float chunk size": (_bad(chunk_size=4.0), "chunk_size=4.0"),
    "3-d q": (_bad(q=torch.zeros(B, T, D, dtype=torch.float64)), "q must be"),
    "k unlike q": (_bad(k=torch.zeros(B, H, T, D + 1, dtype=torch.float64)), "k must have q's shape"),
    "gate per head only": (_bad(theta=torch.zeros(B, H, dtype=torch.float64)), "theta must be"),
    "float32 alpha": (_bad(alpha=torch.zeros(B, H, T)), "alpha is torch.float32"),
    "per-batch weights": (_bad(weights=(torch.zeros(B, H, D, D, dtype=torch.float64),)), "weights[0] of (W,)"),
    "two weights for linear": (_bad(weights=(torch.zeros(H, D, D), torch.zeros(H, D, D))), "must be (W,); got 2"),
    "mlp with Dk != Dv": (
        _bad(kind="mlp", v=torch.zeros(B, H, T, D + 1, dtype=torch.float64)),
        "Dk == Dv",
    ),
    "state without batch dim": (
        _bad(weights=None, state=MemoryState((torch.zeros(H, D, D),), (torch.zeros(H, D, D),))),
        "leading dims (B, H)",
    ),
    "state without momentum": (
        _bad(weights=None, state=MemoryState((torch.zeros(B, H, D, D, dtype=torch.float64),))),
        "state.momentum for kind='linear' must be (W,); got 0",
    ),
    "weights and state": (
        _bad(state=MemoryState((torch.zeros(B, H, D, D),), (torch.zeros(B, H, D, D),))),
        "exactly one of `weights`",
    ),
    "renamed impl": (_bad(impl="cpu_fused"), "impl='cpu_fused' is now called impl='cpu'"),
    "empty sequence": (_bad(**{n: x[:, :, :0] for n, x in make_inputs("linear")[0].items()}), "T=0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_a_value_error_naming_the_problem(case):
    args, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=re.escape(match)):
        titans_memory(**args)


def test_triton_rejects_mlp_memory(triton_linear):
    seq, weights = make_inputs("mlp")
    with pytest.raises(ValueError, match="kind='linear' only"):
        triton_linear(**seq, weights=weights, kind="mlp", chunk_size=4)


def test_sync_free_cumprod_matches_torch_in_value_and_gradient_with_exact_zeros():
    from nl_lightning.ops.titans.coefficients import _cumprod

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 9, generator=gen, dtype=torch.float64)
    x[0, 0, 3] = 0.0  # one zero: gradients before it and at it are nonzero, after it zero
    x[1, 1, 2] = x[1, 1, 6] = 0.0  # two zeros: only the entries up to the first matter
    x[2, 0, -1] = 0.0
    x.requires_grad_()
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours, theirs = _cumprod(x), torch.cumprod(x, -1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    (grad_ours,) = torch.autograd.grad(ours, x, grad_out)
    (grad_theirs,) = torch.autograd.grad(theirs, x, grad_out)
    torch.testing.assert_close(grad_ours, grad_theirs, **F64)
    assert torch.autograd.gradcheck(_cumprod, (x,))
