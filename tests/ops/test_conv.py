"""The memory layers' causal depthwise convolution (``nl_lightning.ops.conv``): every implementation
against the shifted-sum reference, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import on_one_and_two_threads

from nl_lightning.models.layers import CausalDepthwiseConv
from nl_lightning.ops.conv import causal_conv
from nl_lightning.ops.conv.cpu import cpu_causal_conv


@pytest.mark.parametrize("impl", ["chunk", "cpu"])
@pytest.mark.parametrize(
    "kernel,length", [(4, 37), (1, 9), (6, 3), (4, 300)], ids=["k4", "k1", "kernel>T", "k4-T300"]
)  # T300: the fused backward's blocks of 128 tokens, the last one partial
def test_causal_conv_matches_shifted_sum_reference_in_value_and_gradients(kernel, length, impl):
    conv = CausalDepthwiseConv(5, kernel).double()
    with torch.no_grad():
        conv.conv.weight.normal_()  # not the identity init: every tap matters
    x = torch.randn(2, length, 5, dtype=torch.float64, requires_grad=True)
    fast, reference = conv(x, impl=impl), causal_conv(x, conv.conv.weight, impl="naive")
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    assert_same_grads(fast, reference, (x, conv.conv.weight), tol=1e-12)


def assert_same_grads(out, reference, inputs, *, tol):
    """Gradients of ``out`` and ``reference`` w.r.t. ``inputs`` under one random output gradient."""
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["chunk", "cpu"])
def test_causal_conv_normalizes_each_group_of_the_first_channels(impl):
    """Titans' queries and keys: F.normalize per head over the first ``normalized`` channels, the
    rest (values) left as the convolution gives them; values and gradients in float64, including a
    group whose input is all zero (F.normalize's eps clamp)."""
    conv = CausalDepthwiseConv(10, 3).double()
    with torch.no_grad():
        conv.conv.weight.normal_()
    x = torch.randn(2, 140, 10, dtype=torch.float64)  # more than one of the fused backward's blocks
    x[1, :, :4] = 0.0  # batch 1: the first group's convolution is exactly zero
    x.requires_grad_()
    out = conv(x, normalized=8, group=4, impl=impl)
    plain = causal_conv(x, conv.conv.weight, impl="naive")
    heads = [F.normalize(plain[..., :4], dim=-1), F.normalize(plain[..., 4:8], dim=-1)]
    reference = torch.cat([*heads, plain[..., 8:]], -1)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert_same_grads(out, reference, (x, conv.conv.weight), tol=1e-10)
    if impl == "cpu":
        assert torch.autograd.gradcheck(lambda x, w: causal_conv(x, w, normalized=8, group=4, impl="cpu"),
                                        (x.detach()[:1, :9].requires_grad_(), conv.conv.weight))  # not at the clamp


def test_cpu_causal_conv_agrees_on_one_and_two_threads():
    """Rows are split between threads (and the weight gradient summed from per-thread parts): the
    thread count may change only the rounding of that sum."""
    x = torch.randn(3, 300, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 1, 4, dtype=torch.float64, requires_grad=True)

    def run():
        y = causal_conv(x, weight, normalized=8, group=4, impl="cpu")
        return (y, *torch.autograd.grad(y.square().sum(), (x, weight)))

    results = on_one_and_two_threads(run)
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_causal_conv_rejects_what_it_cannot_run_naming_the_fix():
    x, weight = torch.randn(1, 5, 6), torch.randn(6, 1, 3)
    with pytest.raises(ValueError, match="float32/float64 CPU.*impl='chunk'"):
        cpu_causal_conv(x.bfloat16(), weight.bfloat16())
    with pytest.raises(ValueError, match="normalized=4 channels.*multiple of group=3"):
        causal_conv(x, weight, normalized=4, group=3, impl="cpu")
    with pytest.raises(ValueError, match=r"weight \(C, 1, K\)"):
        causal_conv(x, torch.randn(5, 1, 3))
    with pytest.raises(ValueError, match="impl='cpu_fused' is now called impl='cpu'"):
        causal_conv(x, weight, impl="cpu_fused")


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "autocast"])
def test_auto_runs_the_cpu_kernel_only_where_it_is_built_for_the_dtype(monkeypatch, setting):
    """The kernel is built for float32/float64 without autocast; elsewhere "auto" and "cpu" run the
    ATen path, as mixed precision expects."""
    from nl_lightning.ops.conv import cpu

    calls = []
    monkeypatch.setattr(cpu._CausalConv, "apply", lambda *args: calls.append(1) or torch.zeros(1))
    x, weight = torch.randn(1, 5, 6), torch.randn(6, 1, 3)
    if setting == "bfloat16":
        x, weight = x.bfloat16(), weight.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast"):
        for impl in ("auto", "cpu"):
            causal_conv(x, weight, impl=impl)
    assert len(calls) == (2 if setting == "float32" else 0)


def test_causal_conv_output_and_input_gradient_keep_the_b_t_d_layout():
    """The reason for the channels-last form: downstream per-head ops read a contiguous last dim
    (a channel-major output made them several times slower on CPU)."""
    conv = CausalDepthwiseConv(48, 4)
    x = torch.randn(2, 64, 48, requires_grad=True)
    y = conv(x)
    assert y.is_contiguous()
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous()
