"""DGD memory (HOPE, SPEC §2): chunk, compiled and fused CPU kernels against the token-by-token reference."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ON_DEVICES, as_leaves, on_one_and_two_threads
from tests.ops.cuda_compile import run_compile_check

import nl_lightning.ops.dgd as dgd_ops
from nl_lightning.ops import cpu_extension
from nl_lightning.ops import MemoryState
from nl_lightning.ops.dgd import dgd_memory

B, H, T, D, DH = 2, 2, 10, 4, 6
F64 = dict(atol=1e-10, rtol=1e-10)


def make_inputs(kind, *, batch=B, length=T, dtype=torch.float64, seed=0, device="cpu"):
    """Sequence inputs and per-head weights as the model produces them: unit keys, eta and alpha in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    seq = {
        "q": randn(batch, H, length, D),
        "k": F.normalize(randn(batch, H, length, D), dim=-1),
        "v": randn(batch, H, length, D, scale=0.5),
        "eta": torch.rand(batch, H, length, generator=gen, dtype=dtype) * 0.5,
        "alpha": 0.8 + 0.2 * torch.rand(batch, H, length, generator=gen, dtype=dtype),
    }
    if kind == "linear":
        weights = (randn(H, D, D, scale=0.3),)
    else:
        weights = (randn(H, D, DH, scale=0.3), randn(H, DH, D, scale=0.3))
    return as_leaves(seq, weights, device)


def model_size_inputs(*, batch, hidden, device="cpu"):
    """float32 inputs at HOPE-tiny's head size (2 heads of 48, T = 150: two chunks of 64 and a
    partial one) with the gates' and weights' scales of the model."""
    gen = torch.Generator().manual_seed(0)
    heads, length, dim = 2, 150, 48
    seq = {
        "q": F.normalize(torch.randn(batch, heads, length, dim, generator=gen), dim=-1),
        "k": F.normalize(torch.randn(batch, heads, length, dim, generator=gen), dim=-1),
        "v": torch.randn(batch, heads, length, dim, generator=gen),
        "eta": 0.01 * torch.rand(batch, heads, length, generator=gen),
        "alpha": 0.9 + 0.1 * torch.rand(batch, heads, length, generator=gen),
    }
    weights = (
        0.02 * torch.randn(heads, dim, hidden, generator=gen),
        torch.randn(heads, hidden, dim, generator=gen) / 7,
    )
    seq = {n: x.to(device).requires_grad_() for n, x in seq.items()}
    return seq, tuple(w.to(device).requires_grad_() for w in weights)


def run_with_grads(seq, weights, *, kind, chunk_size, impl):
    """Forward, then gradients of a fixed random projection of (o, final state) w.r.t. every input."""
    o, state = dgd_memory(**seq, weights=weights, kind=kind, chunk_size=chunk_size, impl=impl)
    gen = torch.Generator().manual_seed(123)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)).sum() for x in (o, *state.weights))
    grads = torch.autograd.grad(loss, [*seq.values(), *weights])
    return o, state, grads


def assert_same_run(actual, expected, **tol):
    (o_a, state_a, grads_a), (o_e, state_e, grads_e) = actual, expected
    torch.testing.assert_close(o_a, o_e, **tol)
    for a, e in zip(state_a, state_e):
        torch.testing.assert_close(a, e, **tol)
    names = ["q", "k", "v", "eta", "alpha"] + [f"weights[{i}]" for i in range(len(grads_e) - 5)]
    for name, a, e in zip(names, grads_a, grads_e):
        torch.testing.assert_close(a, e, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


@ON_DEVICES
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, T, 16], ids=["online", "C3", "C4", "C=T", "C>T"])
def test_chunk_matches_naive_forward_and_grads_float64(kind, chunk_size, device):
    seq, weights = make_inputs(kind, device=device)
    expected = run_with_grads(seq, weights, kind=kind, chunk_size=chunk_size, impl="naive")
    actual = run_with_grads(seq, weights, kind=kind, chunk_size=chunk_size, impl="chunk")
    assert_same_run(actual, expected, **F64)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@ON_DEVICES
@pytest.mark.parametrize("kind", ["linear", pytest.param("mlp", marks=pytest.mark.slow)])
def test_compiled_matches_chunk_float32(kind, device):
    # A cold inductor compile of forward + backward takes ~20 s (linear) to ~60 s (mlp) on 2 CPU
    # cores, so only the linear kind, which runs the same gated delta-rule chunk, is in the fast
    # suite. C = 4 does not divide T, so the padded final chunk is covered too.
    seq, weights = make_inputs(kind, dtype=torch.float32, device=device)
    expected = run_with_grads(seq, weights, kind=kind, chunk_size=4, impl="chunk")
    actual = run_with_grads(seq, weights, kind=kind, chunk_size=4, impl="compiled")
    assert_same_run(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, T, 16], ids=["online", "C3", "C4", "C=T", "C>T"])
def test_cpu_matches_naive_forward_and_grads_float64(chunk_size):
    """The C++ chunk loop (hand-written backward) against the token-by-token definition."""
    seq, weights = make_inputs("mlp", batch=3)  # 3·H = 6 items: more than one per thread
    expected = run_with_grads(seq, weights, kind="mlp", chunk_size=chunk_size, impl="naive")
    actual = run_with_grads(seq, weights, kind="mlp", chunk_size=chunk_size, impl="cpu")
    assert_same_run(actual, expected, **F64)


def test_cpu_matches_chunk_float32_at_model_sizes():
    """float32 (the polynomial exp, BLAS) at HOPE-tiny's head size, several chunks and a partial one."""
    seq, weights = model_size_inputs(batch=2, hidden=48)
    expected = run_with_grads(seq, weights, kind="mlp", chunk_size=64, impl="chunk")
    actual = run_with_grads(seq, weights, kind="mlp", chunk_size=64, impl="cpu")
    assert_same_run(actual, expected, atol=1e-5, rtol=1e-4)


def test_cpu_gradients_when_only_the_read_outs_are_used():
    # The end state gets no gradient (None in the backward), as in HOPE's main memory.
    seq, weights = make_inputs("mlp")
    grads = {}
    for impl in ("chunk", "cpu"):
        o, _ = dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4, impl=impl)
        grads[impl] = torch.autograd.grad(o.square().sum(), [*seq.values(), *weights])
    for a, e in zip(grads["cpu"], grads["chunk"]):
        torch.testing.assert_close(a, e, **F64)


def test_cpu_gives_identical_results_on_one_and_two_threads():
    """One (batch, head) item per thread with the thread's own scratch: the thread count must not
    change a single bit (a shared buffer would show up here)."""
    seq, weights = make_inputs("mlp", batch=3, dtype=torch.float32)
    runs = on_one_and_two_threads(lambda: run_with_grads(seq, weights, kind="mlp", chunk_size=4, impl="cpu"))
    assert_same_run(runs[1], runs[0], atol=0, rtol=0)


def test_cpu_backward_matches_finite_differences():
    seq, weights = make_inputs("mlp", batch=1, length=5)
    names = list(seq)

    def fn(*xs):
        o, state = dgd_memory(**dict(zip(names, xs[:5])), weights=xs[5:], kind="mlp", chunk_size=2, impl="cpu")
        return o, *state.weights

    assert torch.autograd.gradcheck(fn, (*seq.values(), *weights), fast_mode=True)


def test_cpu_refuses_the_linear_kind_naming_the_fix():
    seq, weights = make_inputs("linear")
    with pytest.raises(ValueError, match="kind='mlp' only, got kind='linear'; use impl='chunk'"):
        dgd_memory(**seq, weights=weights, kind="linear", chunk_size=4, impl="cpu")


def _device_for(impl, request):
    """The device a test runs ``impl`` on: Triton's (``triton_device``), else the CPU."""
    return request.getfixturevalue("triton_device") if impl == "triton" else "cpu"


@pytest.mark.parametrize("chunk_size", [1, 3, 4, T, 16], ids=["online", "C3", "C4", "C=T", "C>T"])
def test_triton_matches_naive_forward_and_grads_float64(triton_device, chunk_size):
    """The Triton chunk loop (hand-written backward; the interpreter on a machine without a GPU)."""
    seq, weights = make_inputs("mlp", device=triton_device)
    expected = run_with_grads(seq, weights, kind="mlp", chunk_size=chunk_size, impl="naive")
    actual = run_with_grads(seq, weights, kind="mlp", chunk_size=chunk_size, impl="triton")
    assert_same_run(actual, expected, **F64)


def test_triton_matches_chunk_float32_at_model_sizes(triton_device):
    """float32 at HOPE-tiny's head size (48: padded to a 64-wide tile), whole chunks of 64 and a
    partial one, against the ATen chunk kernel."""
    seq, weights = model_size_inputs(batch=1, hidden=40, device=triton_device)
    expected = run_with_grads(seq, weights, kind="mlp", chunk_size=64, impl="chunk")
    actual = run_with_grads(seq, weights, kind="mlp", chunk_size=64, impl="triton")
    assert_same_run(actual, expected, atol=1e-5, rtol=1e-4)


def test_triton_gradients_when_only_the_read_outs_are_used(triton_device):
    seq, weights = make_inputs("mlp", device=triton_device)
    grads = {}
    for impl in ("chunk", "triton"):
        o, _ = dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4, impl=impl)
        grads[impl] = torch.autograd.grad(o.square().sum(), [*seq.values(), *weights])
    for a, e in zip(grads["triton"], grads["chunk"]):
        torch.testing.assert_close(a, e, **F64)


def test_triton_continues_from_a_passed_state(triton_device):
    seq, weights = make_inputs("mlp", device=triton_device)
    whole, whole_state = dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4, impl="chunk")
    first = {n: x[:, :, :8] for n, x in seq.items()}
    second = {n: x[:, :, 8:] for n, x in seq.items()}
    o1, mid = dgd_memory(**first, weights=weights, kind="mlp", chunk_size=4, impl="triton")
    o2, state = dgd_memory(**second, state=mid, kind="mlp", chunk_size=4, impl="triton")
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), whole, **F64)
    for a, e in zip(state, whole_state):
        torch.testing.assert_close(a, e, **F64)


def test_triton_refuses_the_linear_kind_and_uninterpreted_cpu_tensors(triton_device, monkeypatch):
    seq, weights = make_inputs("linear", device=triton_device)
    with pytest.raises(ValueError, match="kind='mlp' only, got kind='linear'; use impl='chunk'"):
        dgd_memory(**seq, weights=weights, kind="linear", chunk_size=4, impl="triton")
    from nl_lightning.ops import triton_launch

    monkeypatch.setattr(triton_launch, "interpreting", lambda: False)
    seq, weights = make_inputs("mlp")
    with pytest.raises(RuntimeError, match="CPU tensors but Triton is not in interpreter mode"):
        dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4, impl="triton")


def test_triton_refuses_widths_beyond_its_tiles_naming_the_fix(triton_device):
    seq, weights = make_inputs("mlp", device=triton_device)
    wide = {n: torch.cat([x.detach()] * 17, dim=-1) if n in "qkv" else x.detach() for n, x in seq.items()}
    wide_weights = (torch.zeros(H, 17 * D, DH, dtype=torch.float64), torch.zeros(H, DH, 17 * D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"widths up to 64.*'head dim D': 68.*Use impl='chunk'"):
        dgd_memory(**wide, weights=tuple(w.to(triton_device) for w in wide_weights), kind="mlp", chunk_size=4,
                   impl="triton")
    long = {n: torch.cat([x.detach()] * 7, dim=2) for n, x in seq.items()}  # T = 70
    with pytest.raises(ValueError, match=r"'chunk_size': 70"):
        dgd_memory(**long, weights=weights, kind="mlp", chunk_size=128, impl="triton")


def test_triton_kernels_compile_once_for_any_length_and_chunk_size():
    # Triton specialises ints that are 1 or multiples of 16 unless told not to: a new length or
    # chunk size would recompile, and the backward kernel takes minutes to compile.
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; install the dev extra to test the Triton kernels")
    source = (Path(dgd_ops.__file__).parent / "triton_kernels.py").read_text()
    assert source.count("@triton.jit(do_not_specialize=RUNTIME_INTS)") == 2
    assert 'RUNTIME_INTS = ["N", "C", "D", "DH"]' in source


CUDA_COMPILE_CHECK = """
import sys
import torch
from tests.ops.cuda_compile import assert_compiles
from nl_lightning.ops.dgd import triton as triton_mlp

arch, shared_limit, delta, self_target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "delta", sys.argv[4] == "self"
options = triton_mlp.launch_options(64, 48, 48, torch.float32, (delta, self_target))  # HOPE-tiny's main memory
assert_compiles(triton_mlp.kernels(), options, "N", arch, shared_limit)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "target"), [("delta", "value"), ("dgd", "self")], ids=["delta-value", "dgd-self"])
@pytest.mark.parametrize(("arch", "shared_kb"), [(80, 163), (90, 227)], ids=["a100", "h100"])
def test_triton_kernels_compile_for_cuda_within_the_shared_memory(arch, shared_kb, rule, target):
    # No GPU needed (tests/ops/cuda_compile.py). About 100 s per architecture and rule on 2 cores.
    run_compile_check(CUDA_COMPILE_CHECK, str(arch), str(shared_kb * 1024), rule, target)


def _count_calls(monkeypatch):
    calls = {"cpu": 0, "chunk": 0}
    for name in calls:
        original = dgd_ops._FUNCTIONS[name]

        def counted(*args, name=name, original=original, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setitem(dgd_ops._FUNCTIONS, name, counted)
    return calls


@pytest.mark.parametrize(("kind", "expected"), [("mlp", "cpu"), ("linear", "chunk")])
def test_auto_picks_the_fused_kernel_for_mlp_memories_on_cpu(monkeypatch, kind, expected):
    calls = _count_calls(monkeypatch)
    seq, weights = make_inputs(kind)
    dgd_memory(**seq, weights=weights, kind=kind, chunk_size=4, impl="auto")
    assert calls == {"cpu": int(expected == "cpu"), "chunk": int(expected == "chunk")}


def test_auto_falls_back_to_chunk_with_one_warning_when_the_kernel_cannot_build(monkeypatch, unbuildable_cpu_kernels):
    calls = _count_calls(monkeypatch)
    seq, weights = make_inputs("mlp")
    with pytest.warns(RuntimeWarning, match="no compiler.*falls back to 'chunk'"):
        dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4, impl="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, not on every call
        dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4, impl="auto")
    assert calls == {"cpu": 0, "chunk": 2}


def test_chunk_backward_matches_finite_differences():
    seq, weights = make_inputs("mlp", batch=1, length=5)
    names = list(seq)

    def fn(*xs):
        o, state = dgd_memory(**dict(zip(names, xs[:5])), weights=xs[5:], kind="mlp", chunk_size=2)
        return o, *state.weights

    assert torch.autograd.gradcheck(fn, (*seq.values(), *weights), fast_mode=True)


@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_linear_online_step_is_the_dgd_rule(impl):
    seq, (w,) = make_inputs("linear", batch=1, length=1)
    o, ((w_new,), _) = dgd_memory(**seq, weights=(w,), kind="linear", chunk_size=1, impl=impl)
    w0 = w[0].detach()
    q, k, v = (seq[n][0, 0, 0].detach() for n in "qkv")
    eta, alpha = seq["eta"][0, 0, 0].item(), seq["alpha"][0, 0, 0].item()
    target = w0 @ v
    expected = w0 @ (alpha * torch.eye(D, dtype=w0.dtype) - eta * torch.outer(k, k)) - eta * 2 * torch.outer(
        w0 @ k - target, k
    )
    torch.testing.assert_close(w_new[0, 0], expected, **F64)
    torch.testing.assert_close(o[0, 0, 0], expected @ q, **F64)


@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_mlp_step_uses_inner_gradient_with_constant_target(impl):
    seq, (w1, w2) = make_inputs("mlp", batch=1, length=1)
    _, ((w1_new, w2_new), _) = dgd_memory(**seq, weights=(w1, w2), kind="mlp", chunk_size=1, impl=impl)
    k, v = (seq[n][0, 0, 0].detach() for n in "kv")
    eta, alpha = seq["eta"][0, 0, 0].item(), seq["alpha"][0, 0, 0].item()
    a1, a2 = w1[0].detach().clone().requires_grad_(), w2[0].detach().clone().requires_grad_()

    def memory(z):
        return z + a1 @ F.silu(a2 @ z)

    loss = (memory(k) - memory(v).detach()).square().sum()  # stop-gradient on the target
    g1, g2 = torch.autograd.grad(loss, (a1, a2))
    hidden = F.silu(a2 @ k).detach()
    eye_h, eye_d = torch.eye(DH, dtype=k.dtype), torch.eye(D, dtype=k.dtype)
    expected_w1 = a1.detach() @ (alpha * eye_h - eta * torch.outer(hidden, hidden)) - eta * g1
    expected_w2 = a2.detach() @ (alpha * eye_d - eta * torch.outer(k, k)) - eta * g2
    torch.testing.assert_close(w1_new[0, 0], expected_w1, **F64)
    torch.testing.assert_close(w2_new[0, 0], expected_w2, **F64)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_batch_elements_do_not_share_state(kind):
    seq, weights = make_inputs(kind)
    o, state = dgd_memory(**seq, weights=weights, kind=kind, chunk_size=3)
    changed = {name: x.detach().clone() for name, x in seq.items()}
    for name in ("q", "k", "v"):
        changed[name][1] = torch.randn_like(changed[name][1])
    o2, state2 = dgd_memory(**changed, weights=weights, kind=kind, chunk_size=3)
    torch.testing.assert_close(o2[0], o[0], **F64)
    for a, b in zip(state2.weights, state.weights):
        torch.testing.assert_close(a[0], b[0], **F64)
        assert not torch.allclose(a[1], b[1])


@pytest.mark.parametrize(
    ("kind", "impl"),
    [("linear", "naive"), ("linear", "chunk"), ("mlp", "naive"), ("mlp", "chunk"), ("mlp", "cpu"),
     ("mlp", "triton")],
)
def test_output_at_t_ignores_later_tokens(kind, impl, request):
    seq, weights = make_inputs(kind, device=_device_for(impl, request))
    o, _ = dgd_memory(**seq, weights=weights, kind=kind, chunk_size=4, impl=impl)
    t0 = 5  # mid-chunk, so later tokens of the same chunk are perturbed too
    changed = {name: x.detach().clone() for name, x in seq.items()}
    for name in ("q", "k", "v", "eta", "alpha"):
        changed[name][:, :, t0:] = changed[name][:, :, t0:].flip(2)
    o2, _ = dgd_memory(**changed, weights=weights, kind=kind, chunk_size=4, impl=impl)
    torch.testing.assert_close(o2[:, :, :t0], o[:, :, :t0], **F64)
    assert not torch.allclose(o2[:, :, t0:], o[:, :, t0:])


@pytest.mark.parametrize("impl", ["naive", "chunk", "cpu", "triton"])
def test_sequence_shorter_than_chunk_still_updates_state(impl, request):
    seq, weights = make_inputs("mlp", length=3, device=_device_for(impl, request))
    _, state = dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=8, impl=impl)
    for initial, final in zip(weights, state.weights):
        assert not torch.allclose(final, initial.expand_as(final))
    _, online_state = dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=3, impl="naive")
    for a, b in zip(state, online_state):  # one chunk either way
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize(
    ("chunk_size", "split"), [(4, 8), (1, 3)], ids=["split-at-chunk-boundary", "online-any-split"]
)
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_state_passed_over_two_calls_equals_one_call(kind, chunk_size, split):
    # Each call starts a fresh chunk, so two calls equal one only when the split is on a chunk
    # boundary of the single call (any split when chunk_size = 1).
    seq, weights = make_inputs(kind)
    whole = run_with_grads(seq, weights, kind=kind, chunk_size=chunk_size, impl="chunk")

    first = {n: x[:, :, :split] for n, x in seq.items()}
    second = {n: x[:, :, split:] for n, x in seq.items()}
    o1, mid = dgd_memory(**first, weights=weights, kind=kind, chunk_size=chunk_size)
    o2, state = dgd_memory(**second, state=mid, kind=kind, chunk_size=chunk_size)
    o = torch.cat([o1, o2], dim=2)
    gen = torch.Generator().manual_seed(123)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in (o, *state.weights))
    grads = torch.autograd.grad(loss, [*seq.values(), *weights])
    assert_same_run((o, state, grads), whole, **F64)


@pytest.mark.parametrize("impl", ["chunk", "cpu", "triton"])
def test_tiny_alpha_stays_finite_and_matches_naive(impl, request):
    # prod(alpha) over the chunk is ~1e-400, far below float64's smallest normal: a kernel that
    # divided by cumulative products would produce inf/nan here.
    seq, weights = make_inputs("mlp", device=_device_for(impl, request))
    with torch.no_grad():
        seq["alpha"].fill_(1e-40)
    expected = run_with_grads(seq, weights, kind="mlp", chunk_size=T, impl="naive")
    actual = run_with_grads(seq, weights, kind="mlp", chunk_size=T, impl=impl)
    for x in (actual[0], *actual[1].weights, *actual[2]):
        assert torch.isfinite(x).all()
    assert_same_run(actual, expected, **F64)


def test_bfloat16_inputs_run_in_float32_and_return_bfloat16():
    seq, weights = make_inputs("mlp", dtype=torch.bfloat16)
    o, state = dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4)
    up = {n: x.detach().float() for n, x in seq.items()}
    up_weights = tuple(w.detach().float() for w in weights)
    o32, state32 = dgd_memory(**up, weights=up_weights, kind="mlp", chunk_size=4)
    assert o.dtype == torch.bfloat16 and all(s.dtype == torch.bfloat16 for s in state.weights)
    torch.testing.assert_close(o, o32.to(torch.bfloat16), atol=0, rtol=0)
    for a, b in zip(state.weights, state32.weights):
        torch.testing.assert_close(a, b.to(torch.bfloat16), atol=0, rtol=0)


def test_autocast_does_not_lower_the_kernel_precision():
    seq, weights = make_inputs("mlp", dtype=torch.float32)
    o, _ = dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_autocast, _ = dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4)
    assert o_autocast.dtype == torch.float32
    torch.testing.assert_close(o_autocast, o, atol=0, rtol=0)


def _bad_calls():
    seq, weights = make_inputs("mlp")
    seq = {n: x.detach() for n, x in seq.items()}
    weights = tuple(w.detach() for w in weights)
    state = MemoryState(tuple(w.expand(B, *w.shape) for w in weights))
    ok = dict(seq, weights=weights, kind="mlp", chunk_size=4)
    return [
        ("kind", dict(ok, kind="gru"), "kind='gru'"),
        ("impl", dict(ok, impl="flash"), "impl='flash'"),
        ("chunk-zero", dict(ok, chunk_size=0), "chunk_size=0"),
        ("chunk-negative", dict(ok, chunk_size=-2), "chunk_size=-2"),
        ("chunk-float", dict(ok, chunk_size=2.0), "chunk_size=2.0"),
        ("q-3d", dict(ok, q=seq["q"][0]), r"q must be \(B, H, T, Dk\)"),
        ("k-shape", dict(ok, k=seq["k"][:, :, :5]), r"k must have q's shape"),
        ("eta-shape", dict(ok, eta=seq["eta"][..., None]), r"eta must be one value per \(batch, head, token\)"),
        ("dtype", dict(ok, v=seq["v"].float()), "v is torch.float32"),
        ("weights-count", dict(ok, weights=weights[:1]), r"must be \(W1, W2\); got 1"),
        ("weights-shape", dict(ok, weights=(weights[0], weights[1][:, :3])), r"weights\[1\]"),
        ("linear-weights", dict(ok, kind="linear"), r"must be \(W,\); got 2"),
        ("both", dict(ok, state=state), "exactly one of `weights`"),
        ("neither", dict(ok, weights=None), "exactly one of `weights`"),
        ("state-no-batch", dict(ok, weights=None, state=MemoryState(weights)), r"leading dims \(B, H\)"),
        ("state-not-a-memory-state", dict(ok, weights=None, state=state.weights), "must be the MemoryState"),
        ("state-with-momentum", dict(ok, weights=None, state=MemoryState(state.weights, state.weights)), "no momentum"),
        ("renamed-impl", dict(ok, impl="cpu_fused"), "impl='cpu_fused' is now called impl='cpu'"),
    ]


@pytest.mark.parametrize(("case", "kwargs", "message"), _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise_value_error_naming_the_value(case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dgd_memory(**kwargs)


def test_fused_kernel_build_name_depends_on_the_cpu_features(monkeypatch):
    # -march=native binaries must not be shared between machines with different instruction sets.
    tags = []
    for flags in ("fpu sse2 avx2 fma", "fpu sse2 avx2 fma avx512f"):
        monkeypatch.setattr(cpu_extension.Path, "read_text", lambda self, flags=flags: f"model name : X\nflags : {flags}\n")
        tags.append(cpu_extension._cpu_tag())
    assert tags[0] != tags[1]
    assert all(len(tag) == 10 and set(tag) <= set("0123456789abcdef") for tag in tags)
