"""Triton kernels for the LINEAR Titans memory: the chunk loop of ``chunk.py`` in one launch.

One program per (batch, head) keeps the memory ``W`` and its momentum ``S`` (Dv x Dk) in
registers and walks the chunks in order, so the state never round-trips through global memory
between chunks. The gate-only chunk coefficients (``chunk.chunk_coefficients``) are computed by
PyTorch beforehand; their gradients flow back to theta/eta/alpha through ordinary autograd.

Backward is a Triton kernel as well: it walks the chunks in reverse, re-reading the chunk-start
states saved by the forward kernel (N x Dv x Dk per (batch, head), small next to q/k/v), and
carries dL/dW, dL/dS from chunk to chunk. Derivation, per chunk (``r``/``s`` are ``mix_end`` /
``surprise_end``, ``b``/``c``/``a`` the ``*_end`` scalars)::

    U = 2 (K W^T - V);  A = mix * (Q K^T)
    Y = beta*(Q W^T) + carry*(Q S^T) - A U
    W' = b W + c S - (r*U)^T K;       S' = a S - (s*U)^T K

The kernels are built on first use, not at import, because Triton decides between compiling
and interpreting (``TRITON_INTERPRET=1``, which runs them on CPU tensors) when a function is
jitted.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from nl_lightning.ops.triton_launch import check_launchable, interpreting, on_device

from .chunk import chunk_coefficients
from nl_lightning.ops.contract import MemoryState


# Sums are written as tl.reduce with Triton's own add combinator instead of tl.sum: tl.sum is a
# jitted library function, fixed as compiled or interpreted when triton.language is first
# imported (torch may import it before TRITON_INTERPRET is set), and the interpreter cannot call
# a compiled one. It recognises this combinator and sums with numpy instead. (The converse,
# compiling for a GPU in a process that imported Triton in interpreter mode, still fails: use
# one mode per process.)
_add = tl.standard._sum_combine


def _forward_kernel(
    Q, K, V, BETA, CARRY, MIX, BETA_END, CARRY_END, MOM_END, MIX_END, SURP_END,
    W0, S0, Y, W_OUT, S_OUT, W_SAVE, S_SAVE,
    N, C, DK, DV,
    BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rk = tl.arange(0, BLOCK_DK)
    rv = tl.arange(0, BLOCK_DV)
    mc, mk, mv = rc < C, rk < DK, rv < DV
    w_off = rv[:, None] * DK + rk[None, :]
    w_mask = mv[:, None] & mk[None, :]
    W = tl.load(W0 + bh * DV * DK + w_off, mask=w_mask, other=0.0)
    S = tl.load(S0 + bh * DV * DK + w_off, mask=w_mask, other=0.0)
    for n in range(N):
        chunk = bh * N + n
        tl.store(W_SAVE + chunk * DV * DK + w_off, W, mask=w_mask)
        tl.store(S_SAVE + chunk * DV * DK + w_off, S, mask=w_mask)
        row = chunk * C + rc  # token rows of this chunk in the (BH * N * C, D) inputs
        q = tl.load(Q + row[:, None] * DK + rk[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
        k = tl.load(K + row[:, None] * DK + rk[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
        v = tl.load(V + row[:, None] * DV + rv[None, :], mask=mc[:, None] & mv[None, :], other=0.0)
        beta = tl.load(BETA + row, mask=mc, other=0.0)
        carry = tl.load(CARRY + row, mask=mc, other=0.0)
        mix_end = tl.load(MIX_END + row, mask=mc, other=0.0)
        surp_end = tl.load(SURP_END + row, mask=mc, other=0.0)
        mix = tl.load(
            MIX + chunk * C * C + rc[:, None] * C + rc[None, :],
            mask=mc[:, None] & mc[None, :],
            other=0.0,
        )
        b_end = tl.load(BETA_END + chunk)
        c_end = tl.load(CARRY_END + chunk)
        m_end = tl.load(MOM_END + chunk)

        u = 2.0 * (tl.dot(k, tl.trans(W), input_precision="ieee") - v)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        y = (
            beta[:, None] * tl.dot(q, tl.trans(W), input_precision="ieee")
            + carry[:, None] * tl.dot(q, tl.trans(S), input_precision="ieee")
            - tl.dot(mix * qk, u, input_precision="ieee")
        )
        tl.store(Y + row[:, None] * DV + rv[None, :], y, mask=mc[:, None] & mv[None, :])
        W_next = b_end * W + c_end * S - tl.dot(tl.trans(u * mix_end[:, None]), k, input_precision="ieee")
        S = m_end * S - tl.dot(tl.trans(u * surp_end[:, None]), k, input_precision="ieee")
        W = W_next
    tl.store(W_OUT + bh * DV * DK + w_off, W, mask=w_mask)
    tl.store(S_OUT + bh * DV * DK + w_off, S, mask=w_mask)


def _backward_kernel(
    Q, K, V, BETA, CARRY, MIX, BETA_END, CARRY_END, MOM_END, MIX_END, SURP_END,
    W_SAVE, S_SAVE, DY, DW_OUT, DS_OUT,
    DQ, DK_, DV_, DBETA, DCARRY, DMIX, DBETA_END, DCARRY_END, DMOM_END, DMIX_END, DSURP_END,
    DW0, DS0,
    N, C, DK, DV,
    BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rk = tl.arange(0, BLOCK_DK)
    rv = tl.arange(0, BLOCK_DV)
    mc, mk, mv = rc < C, rk < DK, rv < DV
    w_off = rv[:, None] * DK + rk[None, :]
    w_mask = mv[:, None] & mk[None, :]
    ck_mask = mc[:, None] & mk[None, :]
    cv_mask = mc[:, None] & mv[None, :]
    cc_off = rc[:, None] * C + rc[None, :]
    cc_mask = mc[:, None] & mc[None, :]
    dW = tl.load(DW_OUT + bh * DV * DK + w_off, mask=w_mask, other=0.0)  # dL/d(state after chunk)
    dS = tl.load(DS_OUT + bh * DV * DK + w_off, mask=w_mask, other=0.0)
    for i in range(N):
        chunk = bh * N + (N - 1 - i)
        W = tl.load(W_SAVE + chunk * DV * DK + w_off, mask=w_mask, other=0.0)
        S = tl.load(S_SAVE + chunk * DV * DK + w_off, mask=w_mask, other=0.0)
        row = chunk * C + rc
        q = tl.load(Q + row[:, None] * DK + rk[None, :], mask=ck_mask, other=0.0)
        k = tl.load(K + row[:, None] * DK + rk[None, :], mask=ck_mask, other=0.0)
        v = tl.load(V + row[:, None] * DV + rv[None, :], mask=cv_mask, other=0.0)
        dy = tl.load(DY + row[:, None] * DV + rv[None, :], mask=cv_mask, other=0.0)
        beta = tl.load(BETA + row, mask=mc, other=0.0)
        carry = tl.load(CARRY + row, mask=mc, other=0.0)
        mix_end = tl.load(MIX_END + row, mask=mc, other=0.0)
        surp_end = tl.load(SURP_END + row, mask=mc, other=0.0)
        mix = tl.load(MIX + chunk * C * C + cc_off, mask=cc_mask, other=0.0)
        b_end = tl.load(BETA_END + chunk)
        c_end = tl.load(CARRY_END + chunk)
        m_end = tl.load(MOM_END + chunk)

        # Recompute the chunk's forward intermediates from the saved chunk-start state.
        u = 2.0 * (tl.dot(k, tl.trans(W), input_precision="ieee") - v)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        qW = tl.dot(q, tl.trans(W), input_precision="ieee")
        qS = tl.dot(q, tl.trans(S), input_precision="ieee")

        # Coefficient gradients.
        dA = -tl.dot(dy, tl.trans(u), input_precision="ieee")
        k_dW = tl.dot(k, tl.trans(dW), input_precision="ieee")  # row j: dW' k_j
        k_dS = tl.dot(k, tl.trans(dS), input_precision="ieee")
        tl.store(DBETA + row, tl.reduce(dy * qW, 1, _add), mask=mc)
        tl.store(DCARRY + row, tl.reduce(dy * qS, 1, _add), mask=mc)
        tl.store(DMIX + chunk * C * C + cc_off, dA * qk, mask=cc_mask)
        tl.store(DMIX_END + row, -tl.reduce(u * k_dW, 1, _add), mask=mc)
        tl.store(DSURP_END + row, -tl.reduce(u * k_dS, 1, _add), mask=mc)
        tl.store(DBETA_END + chunk, tl.reduce(tl.reduce(dW * W, 1, _add), 0, _add))
        tl.store(DCARRY_END + chunk, tl.reduce(tl.reduce(dW * S, 1, _add), 0, _add))
        tl.store(DMOM_END + chunk, tl.reduce(tl.reduce(dS * S, 1, _add), 0, _add))

        # Input gradients; dE is the gradient of the chunk-start error K W^T - V.
        dqk = dA * mix
        du = (
            -tl.dot(tl.trans(mix * qk), dy, input_precision="ieee")
            - mix_end[:, None] * k_dW
            - surp_end[:, None] * k_dS
        )
        dE = 2.0 * du
        beta_dy = beta[:, None] * dy
        carry_dy = carry[:, None] * dy
        dq = (
            tl.dot(beta_dy, W, input_precision="ieee")
            + tl.dot(carry_dy, S, input_precision="ieee")
            + tl.dot(dqk, k, input_precision="ieee")
        )
        dk = (
            tl.dot(tl.trans(dqk), q, input_precision="ieee")
            - tl.dot(mix_end[:, None] * u, dW, input_precision="ieee")
            - tl.dot(surp_end[:, None] * u, dS, input_precision="ieee")
            + tl.dot(dE, W, input_precision="ieee")
        )
        tl.store(DQ + row[:, None] * DK + rk[None, :], dq, mask=ck_mask)
        tl.store(DK_ + row[:, None] * DK + rk[None, :], dk, mask=ck_mask)
        tl.store(DV_ + row[:, None] * DV + rv[None, :], -dE, mask=cv_mask)

        # Hand dL/d(chunk-start state) to the previous chunk.
        dW_prev = (
            b_end * dW
            + tl.dot(tl.trans(beta_dy), q, input_precision="ieee")
            + tl.dot(tl.trans(dE), k, input_precision="ieee")
        )
        dS = c_end * dW + m_end * dS + tl.dot(tl.trans(carry_dy), q, input_precision="ieee")
        dW = dW_prev
    tl.store(DW0 + bh * DV * DK + w_off, dW, mask=w_mask)
    tl.store(DS0 + bh * DV * DK + w_off, dS, mask=w_mask)


# Integer arguments Triton must not specialise on. By default it compiles a separate binary when
# an int is 1 or a multiple of 16, so a new sequence length (N) or chunk size (C) could trigger a
# fresh compile, and the backward kernel at 64-wide blocks takes minutes to compile (141 s for
# sm_90 float32 on the 2-core development VM). The block sizes are the compile-time constants.
_RUNTIME_INTS = ["N", "C", "DK", "DV"]


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """Jit the kernels once per mode (the mode is part of the key so a changed
    ``TRITON_INTERPRET`` is honoured instead of silently reusing the other kind)."""
    return tuple(triton.jit(kernel, do_not_specialize=_RUNTIME_INTS) for kernel in (_forward_kernel, _backward_kernel))


def _launch_options(C: int, Dk: int, Dv: int) -> dict:
    # Powers of two for tl.arange, and at least 16 because tl.dot needs that on GPUs.
    # num_stages=1: chunks depend on each other, so software-pipelining the chunk loop buys
    # little and multiplies shared memory (C=64, D=32 float32 backward: 74 KB at one stage,
    # 166 KB at the default three, which no longer fits an A100).
    return {
        "BLOCK_C": max(16, triton.next_power_of_2(C)),
        "BLOCK_DK": max(16, triton.next_power_of_2(Dk)),
        "BLOCK_DV": max(16, triton.next_power_of_2(Dv)),
        "num_stages": 1,
    }


class _LinearChunkFunction(torch.autograd.Function):
    """Kernel pair as one autograd op. Tokens come flattened to ``(B*H, N*C, D)`` (padded to whole
    chunks), coefficients to ``(B*H, N, ...)``, states to ``(B*H, Dv, Dk)``; all contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, beta, carry, mix, beta_end, carry_end, mom_end, mix_end, surp_end, W0, S0):
        BH, NC, Dk = q.shape
        N, C = beta.shape[1], beta.shape[2]
        Dv = v.shape[-1]
        forward_kernel, _ = _kernels(interpreting())
        y = torch.empty_like(v)
        W_out, S_out = torch.empty_like(W0), torch.empty_like(S0)
        W_save = q.new_empty(BH, N, Dv, Dk)
        S_save = q.new_empty(BH, N, Dv, Dk)
        coeffs = (beta, carry, mix, beta_end, carry_end, mom_end, mix_end, surp_end)
        with on_device(q):
            forward_kernel[(BH,)](
                q, k, v, *coeffs, W0, S0, y, W_out, S_out, W_save, S_save,
                N, C, Dk, Dv, **_launch_options(C, Dk, Dv),
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, *coeffs, W_save, S_save)
        return y, W_out, S_out

    @staticmethod
    def backward(ctx, dy, dW_out, dS_out):
        q, k, v, *coeffs, W_save, S_save = ctx.saved_tensors
        BH, NC, Dk = q.shape
        N, C = coeffs[0].shape[1], coeffs[0].shape[2]
        Dv = v.shape[-1]
        _, backward_kernel = _kernels(interpreting())
        dy, dW_out, dS_out = (t.contiguous() for t in (dy, dW_out, dS_out))
        grads_in = [torch.empty_like(t) for t in (q, k, v)]
        grads_coeffs = [torch.empty_like(t) for t in coeffs]
        dW0 = q.new_empty(BH, Dv, Dk)
        dS0 = q.new_empty(BH, Dv, Dk)
        with on_device(q):
            backward_kernel[(BH,)](
                q, k, v, *coeffs, W_save, S_save, dy, dW_out, dS_out,
                *grads_in, *grads_coeffs, dW0, dS0,
                N, C, Dk, Dv, **_launch_options(C, Dk, Dv),
            )  # fmt: skip
        return (*grads_in, *grads_coeffs, dW0, dS0)


def triton_titans_memory(q, k, v, theta, eta, alpha, start: MemoryState, *, kind: str, chunk_size: int):
    """Linear Titans memory through the Triton kernels; same contract as ``chunk_titans_memory``.

    Runs on CUDA tensors, or on CPU tensors while ``TRITON_INTERPRET=1`` is set (Triton's
    interpreter: slow, for testing). Backward runs the Triton backward kernel too.
    """
    if kind != "linear":
        raise ValueError(
            f"impl='triton' implements kind='linear' only for the Titans memory; got kind={kind!r}. "
            "Use impl='cpu', 'chunk' or 'compiled' for the MLP memory."
        )
    check_launchable(q, "the Triton memory kernel", "impl='chunk'")
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    cf = chunk_coefficients(theta, eta, alpha, C)
    W0, S0 = start.weights[0], start.momentum[0]

    def tokens(t: Tensor) -> Tensor:  # (B, H, T, D) -> padded, contiguous (B*H, N*C, D)
        return F.pad(t, (0, 0, 0, N * C - T)).reshape(B * H, N * C, t.shape[-1]).contiguous()

    # The kernels take the theta-scaled mix (the chunk kernel scales its keys by theta instead).
    coeffs = (
        cf.beta, cf.carry, cf.mix(), cf.beta_end, cf.carry_end, cf.momentum_end, cf.mix_end, cf.surprise_end,
    )  # fmt: skip
    flat = [c.reshape(B * H, *c.shape[2:]).contiguous() for c in coeffs]
    y, W, S = _LinearChunkFunction.apply(
        tokens(q), tokens(k), tokens(v), *flat,
        W0.reshape(B * H, Dv, Dk).contiguous(), S0.reshape(B * H, Dv, Dk).contiguous(),
    )  # fmt: skip
    y = y.view(B, H, N * C, Dv)[:, :, :T]
    return y, MemoryState((W.view(B, H, Dv, Dk),), (S.view(B, H, Dv, Dk),))
