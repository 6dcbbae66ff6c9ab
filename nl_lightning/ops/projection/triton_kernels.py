"""Triton kernels for one chunk's write of HOPE's projection memories (``triton.py`` launches
them).

The state update of ``shared_key.py`` (DGD rule) and of the DGD op's chunk kernel (delta rule), for
the four memories at once: one program per (batch, memory) pair, for one chunk. The equations are
those of ``ops/dgd/triton_kernels.py`` without the read-outs (nothing reads the projection
memories inside the chunk they write; the next chunk's projections come from the end state)::

    pre = k W2ᵀ, hid = silu(pre), hw1 = hid W1ᵀ, d1 = c (k + hw1 - tgt)
    m = d1 W1,   r1 = S1⁻¹ (-η1 d1 - η1 (γ_prev - s) hw1),   r2 = KS⁻¹ (-e2 silu'(pre) m - η2 (γ_prev - s) pre)
    W1' = γ_L W1 + (ρ r1)ᵀ hid,  W2' = γ_L W2 + (ρ r2)ᵀ k

with tgt the memory's own target (delta rule: its slow map of the value, passed in) or
v + silu(v W2ᵀ) W1ᵀ (the DGD rule's self-made target), and c, s, η1, η2, e2 as there.

The memories are d_model wide (192 at HOPE-tiny, 512 at small), beyond the 64-wide tiles one
program holds, so every D-wide tensor is streamed in BLOCK_D-wide column blocks: a first pass
accumulates what needs all of D (pre, k kᵀ, |k|², v W2ᵀ, |W1[:, j]|²), after which every
C x Dh and C x C quantity is known and each block of W1' and W2' follows from its own columns.
The chunk and the hidden size stay whole (C, Dh <= 64). The forward saves both system inverses
for the backward, which recomputes the rest from the chunk-start state and runs four passes over
the blocks, in the order the chain rule makes the D-reduced gradients (dL/dhid, dL/dm, dL/dpre)
complete. k, the gates and (under the DGD rule) v are shared by the memories: each program
writes its own gradient of them and ``triton.py`` sums over the memories.

Same rules as ``ops/dgd/triton_kernels.py``, whose helpers this module calls: only Triton builtins,
and jitted at import (``triton.py`` imports it on first use).
"""

from __future__ import annotations

import triton
import triton.language as tl

from nl_lightning.ops.dgd.triton_kernels import (
    _add,
    _curvature_backward,
    _decays,
    _decays_backward,
    _dot,
    _key_system_backward,
    _layer_step,
    _layer_step_backward,
    _retained,
    _rowsum,
    _sigmoid,
    _silu_d1,
    _system_inverse,
    _w2_step,
)

# Integer arguments Triton must not specialise on (a new chunk length, width or stride would
# otherwise compile a new binary); the block sizes are the compile-time constants.
RUNTIME_INTS = ["C", "D", "DH", "MEMORIES", "V_STRIDE_B", "V_STRIDE_M"]


@triton.jit
def _program_inputs(K, V, ETA, ALPHA, W1, W2, C, D, DH, MEMORIES, V_STRIDE_B, V_STRIDE_M, BLOCK_C: tl.constexpr):
    """This program's (batch item, memory): its index, where its keys, targets and state start,
    and the item's gates (rows past C: η = 0, α = 1, which leave the state unchanged)."""
    program = tl.program_id(0).to(tl.int64)
    batch = program // MEMORIES
    rc = tl.arange(0, BLOCK_C)
    eta = tl.load(ETA + batch * C + rc, mask=rc < C, other=0.0)
    alpha = tl.load(ALPHA + batch * C + rc, mask=rc < C, other=1.0)
    v_base = V + batch * V_STRIDE_B + (program % MEMORIES) * V_STRIDE_M
    return program, K + batch * C * D, v_base, W1 + program * D * DH, W2 + program * DH * D, eta, alpha


@triton.jit
def _block(d0, C, D, DH, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Offsets and masks of the column block starting at ``d0``: in a (C, D) token tensor, in W1
    (D, Dh) and in W2 (Dh, D)."""
    rc = tl.arange(0, BLOCK_C)
    cols = d0 + tl.arange(0, BLOCK_D)
    rh = tl.arange(0, BLOCK_H)
    tokens_off = rc[:, None] * D + cols[None, :]
    tokens_mask = (rc < C)[:, None] & (cols < D)[None, :]
    w1_off = cols[:, None] * DH + rh[None, :]
    w1_mask = (cols < D)[:, None] & (rh < DH)[None, :]
    w2_off = rh[:, None] * D + cols[None, :]
    w2_mask = (rh < DH)[:, None] & (cols < D)[None, :]
    return tokens_off, tokens_mask, w1_off, w1_mask, w2_off, w2_mask


@triton.jit
def _key_sums(k_base, v_base, w1_base, w2_base, eta, C, D, DH, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_H: tl.constexpr, SELF_TARGET: tl.constexpr):  # fmt: skip
    """The first pass over D: pre = k W2ᵀ, k kᵀ, |k|², a = v W2ᵀ (self target) and |W1[:, j]|²."""
    pre = tl.full([BLOCK_C, BLOCK_H], 0.0, eta.dtype)
    a = tl.full([BLOCK_C, BLOCK_H], 0.0, eta.dtype)
    gram_k = tl.full([BLOCK_C, BLOCK_C], 0.0, eta.dtype)
    norm_k = tl.full([BLOCK_C], 0.0, eta.dtype)
    colsq = tl.full([BLOCK_H], 0.0, eta.dtype)
    for d0 in range(0, D, BLOCK_D):
        tokens_off, tokens_mask, w1_off, w1_mask, w2_off, w2_mask = _block(d0, C, D, DH, BLOCK_C, BLOCK_D, BLOCK_H)
        k = tl.load(k_base + tokens_off, mask=tokens_mask, other=0.0)
        w1 = tl.load(w1_base + w1_off, mask=w1_mask, other=0.0)
        w2 = tl.load(w2_base + w2_off, mask=w2_mask, other=0.0)
        pre += _dot(k, tl.trans(w2))
        gram_k += _dot(k, tl.trans(k))
        norm_k += _rowsum(k * k)
        colsq += tl.reduce(w1 * w1, 0, _add)
        if SELF_TARGET:
            v = tl.load(v_base + tokens_off, mask=tokens_mask, other=0.0)
            a += _dot(v, tl.trans(w2))
    return pre, a, gram_k, norm_k, colsq


@triton.jit
def _chunk_terms(k_base, v_base, w1_base, w2_base, eta, alpha, inverses, C, D, DH, SAVED: tl.constexpr,
                 TINY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                 DELTA: tl.constexpr, SELF_TARGET: tl.constexpr, EPS: tl.constexpr,
                 CURVATURE_EPS: tl.constexpr):  # fmt: skip
    """Every C-sized, C x C and C x Dh value of the chunk (no D-wide ones): the first pass over D
    and what follows from it. ``inverses`` points at the program's two system inverses, solved and
    saved (forward) or read back (backward, ``SAVED``)."""
    rows = tl.arange(0, BLOCK_C)[:, None]
    log_alpha, lg, lgp, ra, pr = _decays(alpha, TINY, BLOCK_C)
    after = _retained(lgp, DELTA)  # γ_prev - s
    pre, a, gram_k, norm_k, colsq = _key_sums(k_base, v_base, w1_base, w2_base, eta, C, D, DH, BLOCK_C, BLOCK_D,
                                              BLOCK_H, SELF_TARGET)  # fmt: skip
    eta2 = _layer_step(eta, norm_k, DELTA, EPS)
    s_pre = _sigmoid(pre)
    hid = pre * s_pre
    slope = _silu_d1(pre, s_pre)
    norm_hid = _rowsum(hid * hid)
    eta1 = _layer_step(eta, norm_hid, DELTA, EPS)
    kappa, e2 = _w2_step(eta2, eta1, norm_hid, slope, colsq, DELTA, CURVATURE_EPS)
    gram = _dot(hid, tl.trans(hid))
    ks_inv = _system_inverse(eta2[:, None] * pr * gram_k, inverses, SAVED, BLOCK_C)
    s1_inv = _system_inverse(eta1[:, None] * pr * gram, inverses + BLOCK_C * BLOCK_C, SAVED, BLOCK_C)
    silu_a = a * _sigmoid(a)
    rho = tl.reduce(tl.where(rows == BLOCK_C - 1, ra, 0.0), 0, _add)  # γ_L / γ_i (padded rows keep α = 1)
    gamma_end = tl.exp(tl.reduce(log_alpha, 0, _add))
    return (lgp, after, ra, pr, pre, a, silu_a, gram_k, norm_k, colsq, eta2, s_pre, hid, slope, norm_hid, eta1,
            kappa, e2, gram, ks_inv, s1_inv, rho, gamma_end)  # fmt: skip


@triton.jit
def _block_error(k, tgt, hid, silu_a, w1, DELTA: tl.constexpr, SELF_TARGET: tl.constexpr):
    """hw1 and d1 = c (k + hw1 - tgt) on one column block; under the self target ``tgt`` is the
    block of v and the target v + silu(a) W1ᵀ."""
    hw1 = _dot(hid, tl.trans(w1))
    d1 = k + hw1 - tgt
    if SELF_TARGET:
        d1 -= _dot(silu_a, tl.trans(w1))
    if not DELTA:
        d1 = 2.0 * d1
    return hw1, d1


@triton.jit(do_not_specialize=RUNTIME_INTS)
def projection_write_forward_kernel(
    K, V, ETA, ALPHA, W1, W2, NEW_W1, NEW_W2, INVERSES,
    C, D, DH, MEMORIES, V_STRIDE_B, V_STRIDE_M,
    TINY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    DELTA: tl.constexpr, SELF_TARGET: tl.constexpr, EPS: tl.constexpr, CURVATURE_EPS: tl.constexpr,
):  # fmt: skip
    """One chunk for B·M programs (B batch items, M memories). K (B, C, D) the keys; V the targets
    (delta rule, (B, M, C, D)) or the values (self target, (B, C, D)), at strides V_STRIDE_B,
    V_STRIDE_M (0: shared by the memories); ETA, ALPHA (B, C); W1 (B, M, D, Dh), W2 (B, M, Dh, D)
    the chunk-start state; NEW_W1, NEW_W2 the end state (written); INVERSES (B, M, 2, BLOCK_C,
    BLOCK_C) the two system inverses (written, for the backward)."""
    program, k_base, v_base, w1_base, w2_base, eta, alpha = _program_inputs(
        K, V, ETA, ALPHA, W1, W2, C, D, DH, MEMORIES, V_STRIDE_B, V_STRIDE_M, BLOCK_C)
    (lgp, after, ra, pr, pre, a, silu_a, gram_k, norm_k, colsq, eta2, s_pre, hid, slope, norm_hid, eta1, kappa, e2,
     gram, ks_inv, s1_inv, rho, gamma_end) = _chunk_terms(
        k_base, v_base, w1_base, w2_base, eta, alpha, INVERSES + program * 2 * BLOCK_C * BLOCK_C, C, D, DH, False,
        TINY, BLOCK_C, BLOCK_D, BLOCK_H, DELTA, SELF_TARGET, EPS, CURVATURE_EPS)  # fmt: skip
    gpe1 = eta1 * after
    # W1, block by block: its update needs the block's own columns only; m = d1 W1 sums over them.
    m = tl.full([BLOCK_C, BLOCK_H], 0.0, eta.dtype)
    for d0 in range(0, D, BLOCK_D):
        tokens_off, tokens_mask, w1_off, w1_mask, w2_off, w2_mask = _block(d0, C, D, DH, BLOCK_C, BLOCK_D, BLOCK_H)
        k = tl.load(k_base + tokens_off, mask=tokens_mask, other=0.0)
        tgt = tl.load(v_base + tokens_off, mask=tokens_mask, other=0.0)
        w1 = tl.load(w1_base + w1_off, mask=w1_mask, other=0.0)
        hw1, d1 = _block_error(k, tgt, hid, silu_a, w1, DELTA, SELF_TARGET)
        m += _dot(d1, w1)
        r1 = _dot(s1_inv, -eta1[:, None] * d1 - gpe1[:, None] * hw1)
        tl.store(NEW_W1 + program * D * DH + w1_off, gamma_end * w1 + _dot(tl.trans(rho[:, None] * r1), hid),
                 mask=w1_mask)
    # W2: r2 needs the whole m; then each block of W2' from its columns of k.
    r2 = _dot(ks_inv, -e2[:, None] * slope * m - (eta2 * after)[:, None] * pre)
    for d0 in range(0, D, BLOCK_D):
        tokens_off, tokens_mask, w1_off, w1_mask, w2_off, w2_mask = _block(d0, C, D, DH, BLOCK_C, BLOCK_D, BLOCK_H)
        k = tl.load(k_base + tokens_off, mask=tokens_mask, other=0.0)
        w2 = tl.load(w2_base + w2_off, mask=w2_mask, other=0.0)
        tl.store(NEW_W2 + program * DH * D + w2_off, gamma_end * w2 + _dot(tl.trans(rho[:, None] * r2), k),
                 mask=w2_mask)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def projection_write_backward_kernel(
    K, V, ETA, ALPHA, W1, W2, INVERSES, DNEW_W1, DNEW_W2, SCRATCH,
    DK, DV, DETA, DALPHA, DW1, DW2,
    C, D, DH, MEMORIES, V_STRIDE_B, V_STRIDE_M,
    TINY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    DELTA: tl.constexpr, SELF_TARGET: tl.constexpr, EPS: tl.constexpr, CURVATURE_EPS: tl.constexpr,
):  # fmt: skip
    """Gradients of the forward kernel's inputs from DNEW_W1, DNEW_W2 (dL/d end state), per
    program: DK, DV (B, M, C, D), DETA, DALPHA (B, M, C) (``triton.py`` sums the shared ones over
    the memories), DW1, DW2 like W1, W2. SCRATCH (B, M, BLOCK_C, BLOCK_C): working memory."""
    program, k_base, v_base, w1_base, w2_base, eta, alpha = _program_inputs(
        K, V, ETA, ALPHA, W1, W2, C, D, DH, MEMORIES, V_STRIDE_B, V_STRIDE_M, BLOCK_C)
    rc = tl.arange(0, BLOCK_C)
    rows = rc[:, None]
    lower = rc[None, :] < rows
    (lgp, after, ra, pr, pre, a, silu_a, gram_k, norm_k, colsq, eta2, s_pre, hid, slope, norm_hid, eta1, kappa, e2,
     gram, ks_inv, s1_inv, rho, gamma_end) = _chunk_terms(
        k_base, v_base, w1_base, w2_base, eta, alpha, INVERSES + program * 2 * BLOCK_C * BLOCK_C, C, D, DH, True,
        TINY, BLOCK_C, BLOCK_D, BLOCK_H, DELTA, SELF_TARGET, EPS, CURVATURE_EPS)  # fmt: skip
    gpe1 = eta1 * after
    gpe2 = eta2 * after

    # Pass 1: m = d1 W1 (for r2), and everything W1' = γ_L W1 + (ρ r1)ᵀ hid and the D-reduced part
    # of W2' = γ_L W2 + (ρ r2)ᵀ k send back that needs no r2: dL/dhid so far, dL/dρ, dL/dS1, and
    # dlr2 = k dW2'ᵀ (dL/dr2 = ρ dlr2).
    m = tl.full([BLOCK_C, BLOCK_H], 0.0, eta.dtype)
    dhid = tl.full([BLOCK_C, BLOCK_H], 0.0, eta.dtype)
    dlr2 = tl.full([BLOCK_C, BLOCK_H], 0.0, eta.dtype)
    ds1 = tl.full([BLOCK_C, BLOCK_C], 0.0, eta.dtype)
    drho = tl.full([BLOCK_C], 0.0, eta.dtype)
    deta1 = tl.full([BLOCK_C], 0.0, eta.dtype)
    dgpe1 = tl.full([BLOCK_C], 0.0, eta.dtype)
    dgamma_end_h = tl.full([BLOCK_H], 0.0, eta.dtype)  # Σ over D of W ⊙ dW', per hidden unit
    for d0 in range(0, D, BLOCK_D):
        tokens_off, tokens_mask, w1_off, w1_mask, w2_off, w2_mask = _block(d0, C, D, DH, BLOCK_C, BLOCK_D, BLOCK_H)
        k = tl.load(k_base + tokens_off, mask=tokens_mask, other=0.0)
        tgt = tl.load(v_base + tokens_off, mask=tokens_mask, other=0.0)
        w1 = tl.load(w1_base + w1_off, mask=w1_mask, other=0.0)
        w2 = tl.load(w2_base + w2_off, mask=w2_mask, other=0.0)
        dnw1 = tl.load(DNEW_W1 + program * D * DH + w1_off, mask=w1_mask, other=0.0)
        dnw2 = tl.load(DNEW_W2 + program * DH * D + w2_off, mask=w2_mask, other=0.0)
        hw1, d1 = _block_error(k, tgt, hid, silu_a, w1, DELTA, SELF_TARGET)
        m += _dot(d1, w1)
        r1 = _dot(s1_inv, -eta1[:, None] * d1 - gpe1[:, None] * hw1)
        dgamma_end_h += tl.reduce(w1 * dnw1, 0, _add) + _rowsum(w2 * dnw2)
        dhid += _dot(rho[:, None] * r1, dnw1)
        dlr1 = _dot(hid, tl.trans(dnw1))
        drho += _rowsum(r1 * dlr1)
        drhs1 = _dot(tl.trans(s1_inv), rho[:, None] * dlr1)  # r1 = S1⁻¹ rhs1
        ds1 -= _dot(drhs1, tl.trans(r1))
        deta1 -= _rowsum(d1 * drhs1)
        dgpe1 -= _rowsum(hw1 * drhs1)
        dhid += _dot(-gpe1[:, None] * drhs1, w1)  # through hw1 in rhs1
        dlr2 += _dot(k, tl.trans(dnw2))
    dgamma_end = tl.reduce(dgamma_end_h, 0, _add)
    # S1 = I + η1 PR ⊙ (hid hidᵀ), strictly lower part.
    ds1 = tl.where(lower, ds1, 0.0)
    deta1 += _rowsum(ds1 * pr * gram)
    dpr = ds1 * eta1[:, None] * gram
    dgram = ds1 * eta1[:, None] * pr
    dhid += _dot(dgram + tl.trans(dgram), hid)
    # r2 = KS⁻¹ rhs2, rhs2 = -e2 silu'(pre) m - gpe2 pre; KS = I + η2 PR ⊙ (k kᵀ).
    r2 = _dot(ks_inv, -e2[:, None] * slope * m - gpe2[:, None] * pre)
    dr2 = rho[:, None] * dlr2
    drho += _rowsum(r2 * dlr2)
    de2, deta2, dgpe2, dm, dpre, curve, dpr2, dgram_k = _key_system_backward(
        ks_inv, dr2, r2, slope, m, pre, s_pre, pr, gram_k, eta2, e2, gpe2, lower)
    dpr += dpr2
    # The steps: η1 = β / (|hid|² + ε), η2 = β / (|k|² + ε) under the delta rule, and W2's
    # e2 = η2 f / (κ + ε_κ) with f = 1 - η1 |hid|², κ = Σ_j silu'(pre_j)² |W1[:, j]|²; all β under DGD.
    dbeta, dhid = _layer_step_backward(eta, eta1, norm_hid, hid, deta1 + dgpe1 * after, dhid, DELTA, EPS)
    if DELTA:
        deta2_e, dbeta_e, dhid_e, dpre_e, dcolsq = _curvature_backward(
            de2, eta, eta1, eta2, e2, norm_hid, kappa, hid, slope, curve, colsq, EPS, CURVATURE_EPS)
        deta2 += deta2_e
        dbeta += dbeta_e
        dhid += dhid_e
        dpre += dpre_e  # and dW1 gets dcolsq ⊙ W1 (pass 2)
        # η2's |k|² sums over D, so its gradient to k is a per-row scale of each block (pass 2),
        # not _layer_step_backward's whole tile.
        inv_k = 1.0 / (norm_k + EPS)
        dstep2 = deta2 + dgpe2 * after
        dbeta += dstep2 * inv_k
        dk_scale = -2.0 * dstep2 * eta2 * inv_k  # dk += dk_scale ⊙ k
    else:
        dbeta += de2 + deta2 + dgpe2 * after
        dcolsq = tl.full([BLOCK_H], 0.0, eta.dtype)
        dk_scale = tl.full([BLOCK_C], 0.0, eta.dtype)

    # Pass 2: dL/dd1 = -η1 dL/drhs1 + dm W1ᵀ completes the error's gradient; W1's gradient is then
    # whole, block by block; k's and the target's get their parts that need no dL/dpre.
    dsa = tl.full([BLOCK_C, BLOCK_H], 0.0, eta.dtype)  # dL/dsilu(a) (self target)
    for d0 in range(0, D, BLOCK_D):
        tokens_off, tokens_mask, w1_off, w1_mask, w2_off, w2_mask = _block(d0, C, D, DH, BLOCK_C, BLOCK_D, BLOCK_H)
        k = tl.load(k_base + tokens_off, mask=tokens_mask, other=0.0)
        tgt = tl.load(v_base + tokens_off, mask=tokens_mask, other=0.0)
        w1 = tl.load(w1_base + w1_off, mask=w1_mask, other=0.0)
        dnw1 = tl.load(DNEW_W1 + program * D * DH + w1_off, mask=w1_mask, other=0.0)
        dnw2 = tl.load(DNEW_W2 + program * DH * D + w2_off, mask=w2_mask, other=0.0)
        hw1, d1 = _block_error(k, tgt, hid, silu_a, w1, DELTA, SELF_TARGET)
        drhs1 = _dot(tl.trans(s1_inv), rho[:, None] * _dot(hid, tl.trans(dnw1)))
        de = -eta1[:, None] * drhs1 + _dot(dm, tl.trans(w1))  # dL/dd1
        if not DELTA:
            de = 2.0 * de  # dL/d(k + hw1 - tgt)
        dhid += _dot(de, w1)  # hw1's part through the error (rhs1's part is in pass 1)
        dhw1 = de - gpe1[:, None] * drhs1
        dw1 = gamma_end * dnw1 + _dot(tl.trans(d1), dm) + _dot(tl.trans(dhw1), hid) + dcolsq[None, :] * w1
        if SELF_TARGET:  # tgt = v + silu(a) W1ᵀ
            dsa -= _dot(de, w1)
            dw1 -= _dot(tl.trans(de), silu_a)
        tl.store(DW1 + program * D * DH + w1_off, dw1, mask=w1_mask)
        dk = _dot(rho[:, None] * r2, dnw2) + de + _dot(dgram_k + tl.trans(dgram_k), k) + dk_scale[:, None] * k
        tl.store(DK + program * C * D + tokens_off, dk, mask=tokens_mask)
        tl.store(DV + program * C * D + tokens_off, -de, mask=tokens_mask)
    # dL/dhid is whole: through hid = silu(pre) to pre, and a = v W2ᵀ's gradient.
    dpre += dhid * slope
    s_a = _sigmoid(a)
    da = dsa * _silu_d1(a, s_a)

    # Pass 3: what reaches the blocks through pre = k W2ᵀ (and a = v W2ᵀ): W2's gradient, and the
    # rest of k's and v's.
    for d0 in range(0, D, BLOCK_D):
        tokens_off, tokens_mask, w1_off, w1_mask, w2_off, w2_mask = _block(d0, C, D, DH, BLOCK_C, BLOCK_D, BLOCK_H)
        k = tl.load(k_base + tokens_off, mask=tokens_mask, other=0.0)
        w2 = tl.load(w2_base + w2_off, mask=w2_mask, other=0.0)
        dnw2 = tl.load(DNEW_W2 + program * DH * D + w2_off, mask=w2_mask, other=0.0)
        dk = tl.load(DK + program * C * D + tokens_off, mask=tokens_mask, other=0.0) + _dot(dpre, w2)
        tl.store(DK + program * C * D + tokens_off, dk, mask=tokens_mask)
        dw2 = gamma_end * dnw2 + _dot(tl.trans(dpre), k)
        if SELF_TARGET:
            v = tl.load(v_base + tokens_off, mask=tokens_mask, other=0.0)
            dw2 += _dot(tl.trans(da), v)
            dv = tl.load(DV + program * C * D + tokens_off, mask=tokens_mask, other=0.0) + _dot(da, w2)
            tl.store(DV + program * C * D + tokens_off, dv, mask=tokens_mask)
        tl.store(DW2 + program * DH * D + w2_off, dw2, mask=w2_mask)

    # The gates' decays: γ_prev in gpe = η (γ_prev - s), γ_L = exp(Σ log α), ρ = RA[last, :].
    dlgp = (dgpe1 * eta1 + dgpe2 * eta2) * tl.exp(lgp)
    dra = tl.where(rows == BLOCK_C - 1, drho[None, :], 0.0)
    dlog = tl.full([BLOCK_C], 0.0, eta.dtype) + dgamma_end * gamma_end
    dlg = tl.full([BLOCK_C], 0.0, eta.dtype)  # nothing reads γ_t itself: no read-outs
    dalpha = _decays_backward(alpha, ra, pr, dlog, dlg, dlgp, dra, dpr, SCRATCH + program * BLOCK_C * BLOCK_C,
                              TINY, BLOCK_C)  # fmt: skip
    tl.store(DETA + program * C + rc, dbeta, mask=rc < C)
    tl.store(DALPHA + program * C + rc, dalpha, mask=rc < C)
