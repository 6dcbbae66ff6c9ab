"""HOPE's projection memories with Triton writes (``ops/projection/triton.py``), under Triton's
interpreter on a machine without a GPU: against the reference loop in float64 (forward and every
gradient, several column blocks), against the chunk path in float32 at HOPE-tiny's size, the
refusals, and (slow) compiled for the GPUs within their shared memory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tests.ops.cuda_compile import run_compile_check
from tests.ops.test_projection import ETA_SCALE, NAMES, projection_inputs, run

from nl_lightning.ops.projection import projection_memories

RULES = ["dgd", "delta"]


def run_triton(x, weights, bias, *, chunk_size, rule, block_d):
    """``run`` with the Triton writes at column block ``block_d`` (the op's default is 64)."""
    from nl_lightning.ops.projection import triton as triton_projection

    out = triton_projection.triton_projection_memory(
        x, weights, bias, chunk_size=chunk_size, eta_scale=ETA_SCALE[rule], rule=rule, block_d=block_d
    )
    gen = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    return [out, *torch.autograd.grad(loss, [x, *weights, bias], allow_unused=True, materialize_grads=True)]


def on(device, x, weights, bias):
    """The inputs as leaves on ``device``."""
    move = lambda t: t.detach().to(device).requires_grad_()  # noqa: E731
    return move(x), tuple(move(w) for w in weights), move(bias)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    ("dim", "block_d", "length", "chunk_size"),
    [(40, 16, 14, 4), (40, 64, 14, 4), (24, 16, 20, 8)],
    ids=["3-blocks-partial", "1-block", "2-blocks-chunk-8"],
)
def test_triton_matches_the_reference_loop_forward_and_grads_float64(triton_device, rule, dim, block_d, length,
                                                                     chunk_size):  # fmt: skip
    """Every gradient reaches x, the slow weights and the gate biases only through the written
    chunks, so matching them checks the backward kernel's every pass; D = 40 in blocks of 16 has
    a partial last block."""
    x, weights, bias = on(triton_device, *projection_inputs(batch=2, length=length, dim=dim))
    expected = run("naive", x, weights, bias, chunk_size=chunk_size, rule=rule)
    actual = run_triton(x, weights, bias, chunk_size=chunk_size, rule=rule, block_d=block_d)
    for name, a, e in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    assert actual[-1].abs().max() > 0  # the later chunks read written memories


@pytest.mark.parametrize("rule", RULES)
def test_triton_matches_chunk_float32_at_tiny_size(triton_device, rule):
    """HOPE-tiny's projection memories (D = 192 in three blocks, Dh = 48, chunks of 64) through the
    op's entry point, against the ATen chunk path on the same device."""
    x, weights, bias = on(triton_device, *projection_inputs(batch=1, length=130, dim=192, hidden=48,
                                                            dtype=torch.float32))  # fmt: skip
    expected = run("chunk", x, weights, bias, chunk_size=64, rule=rule)
    for name, a, e in zip(NAMES, run("triton", x, weights, bias, chunk_size=64, rule=rule), expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * e.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


@pytest.mark.parametrize(
    ("hidden", "chunk_size", "message"),
    [(80, 4, r"'hidden dim Dh': 80"), (8, 128, r"'chunk_size': 128")],
    ids=["hidden", "chunk"],
)
def test_triton_refuses_a_chunk_or_hidden_size_beyond_its_tiles_naming_the_fix(triton_device, hidden, chunk_size,
                                                                              message):  # fmt: skip
    x, weights, bias = on(triton_device, *projection_inputs(length=130, hidden=hidden))
    with pytest.raises(ValueError, match=message + r".*Use impl='chunk'"):
        projection_memories(x, weights, bias, chunk_size=chunk_size, eta_scale=1.0, rule="delta", impl="triton")


def test_triton_kernels_compile_once_for_any_length_and_width():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; install the dev extra to test the Triton kernels")
    source = (Path(__file__).parents[2] / "nl_lightning" / "ops" / "projection" / "triton_kernels.py").read_text()
    assert source.count("@triton.jit(do_not_specialize=RUNTIME_INTS)") == 2
    assert 'RUNTIME_INTS = ["C", "D", "DH", "MEMORIES", "V_STRIDE_B", "V_STRIDE_M"]' in source


CUDA_COMPILE_CHECK = """
import sys
import torch
from tests.ops.cuda_compile import assert_compiles
from nl_lightning.ops.projection import triton as triton_projection

arch, shared_limit, delta = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "delta"
options = triton_projection.write_options(64, 192, 48, torch.float32, delta)  # HOPE-tiny's projections
assert_compiles(triton_projection.kernels(), options, "C", arch, shared_limit)
"""


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("arch", "shared_kb"), [(80, 163), (90, 227)], ids=["a100", "h100"])
def test_triton_kernels_compile_for_cuda_within_the_shared_memory(arch, shared_kb, rule):
    # As tests/ops/test_dgd.py's twin (no GPU needed: tests/ops/cuda_compile.py); ~15 s each.
    run_compile_check(CUDA_COMPILE_CHECK, str(arch), str(shared_kb * 1024), rule)
