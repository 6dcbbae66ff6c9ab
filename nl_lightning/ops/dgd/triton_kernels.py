"""Triton kernels for the DGD MLP memory's chunk loop (``triton.py`` launches them).

The GPU port of ``ops/dgd/dgd_cpu.cpp``: the same equations, names and
forward/backward split, written as tile operations. One program runs the whole chunk loop of one
(batch, head) item with the state (W1: D x Dh, W2: Dh x D) in registers, so a chunk costs no
kernel launches and the state never round-trips through global memory; the ATen chunk kernel
instead launches ~50 small ops per chunk, which on a GPU leaves it idle between launches.

Per chunk (rows t of the chunk, γ = exp(lg), γ_prev = exp(lgp), ρ = RA[last, :])::

    pre = k W2ᵀ, hid = silu(pre), hw1 = hid W1ᵀ, d1 = c (k + hw1 - tgt)
    tgt = v + silu(v W2ᵀ) W1ᵀ (target "self") or v (target "value")
    m = d1 W1, r2 = KS⁻¹ (-e2 silu'(pre) m - η2 (γ_prev - s) pre),   KS = I + η2 PR ⊙ (k kᵀ)
    z = γ (q W2ᵀ) + (RA ⊙ q kᵀ) r2, hq = silu(z)
    r1 = S1⁻¹ (-η1 d1 - η1 (γ_prev - s) hw1),                          S1 = I + η1 PR ⊙ (hid hidᵀ)
    out = q + γ (hq W1ᵀ) + (RA ⊙ hq hidᵀ) r1
    W1' = γ_L W1 + (ρ r1)ᵀ hid,  W2' = γ_L W2 + (ρ r2)ᵀ k

with the write rule's c, s and steps from the gate β (``dgd_cpu.cpp`` and ``naive.py``):
``"dgd"``: c = 2, s = 0, η2 = η1 = e2 = β; ``"delta"``: c = 1, s = 1, η2 = β / (|k|² + ε),
η1 = β / (|hid|² + ε), e2 = η2 (1 - η1 |hid|²) / (κ + ε_κ), κ = Σ_j silu'(pre_j)² |W1[:, j]|².

The unit lower-triangular systems are inverted by forward substitution over the rows of the
(C x C) tile, the one sequential step within a chunk. The forward saves both inverses (2 C² per
chunk, about as much as q, k, v) because the backward needs their transposes: it then runs no
substitution of its own. It recomputes the rest of each chunk from the chunk-start state the
forward saved and walks the chunks in reverse, carrying dL/dW1, dL/dW2 in registers.

Rows past the chunk (C is padded to a power of two) load η = 0, α = 1 and zero q, k, v, so
they leave the state and every real row unchanged; columns past D and Dh are zero throughout.

This module jits its functions at import, so it is imported on first use (``triton.py``):
Triton fixes each function as compiled or interpreted (``TRITON_INTERPRET=1``) when it is jitted.
Only Triton builtins are called, no functions of Triton's standard library (``tl.sum``,
``tl.cumsum``, ``tl.zeros``): those are jitted when ``triton.language`` is first imported,
which torch may do before ``TRITON_INTERPRET`` is set, and the interpreter cannot call compiled
ones (``ops/titans/triton_linear.py``). Sums are ``tl.reduce`` / ``tl.associative_scan`` with the
standard add combinator, which the interpreter recognises and runs with numpy.
"""

from __future__ import annotations

import triton
import triton.language as tl

_add = tl.standard._sum_combine


@triton.jit
def _dot(a, b):
    # IEEE float32 products: TF32 would round the inputs to 10 mantissa bits, far from the CPU
    # kernels and the float32 tolerance the tests hold every implementation to.
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _rowsum(x):
    return tl.reduce(x, 1, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _silu_d1(x, s):
    """silu'(x) from s = sigmoid(x)."""
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def _silu_d2(x, s):
    """silu''(x) from s = sigmoid(x)."""
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


@triton.jit
def _layer_step(beta, norm, DELTA: tl.constexpr, EPS: tl.constexpr):
    """A layer's step from the gate β and its inputs' squared norms: β / (|x|² + ε) under the delta
    rule, β under DGD."""
    if DELTA:
        step = beta / (norm + EPS)
    else:
        step = beta
    return step


@triton.jit
def _layer_step_backward(beta, step, norm, x, dstep, dx, DELTA: tl.constexpr, EPS: tl.constexpr):
    """Backward of ``_layer_step``: dL/dβ, and dx plus dL/dx through |x|² (delta rule only)."""
    if DELTA:
        inv = 1.0 / (norm + EPS)
        dbeta = dstep * inv
        dx = dx + (-2.0 * dstep * step * inv)[:, None] * x
    else:
        dbeta = dstep
    return dbeta, dx


@triton.jit
def _decays(alpha, TINY: tl.constexpr, BLOCK_C: tl.constexpr):
    """log α (clamped to the smallest normal), lg_t = Σ_{j<=t} log α_j, lgp_t = lg_{t-1}, the
    ratio RA[t, i] = exp(Σ_{i<j<=t} log α_j) for i <= t and PR[t, i] = RA[t-1, i] for i < t (both 0
    elsewhere). The ratios are segment sums (a cumulative sum down the masked matrix of log α),
    never differences of the cumulative lg, as in chunk.py."""
    rows = tl.arange(0, BLOCK_C)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    log_alpha = tl.log(tl.maximum(alpha, TINY))
    lg = tl.associative_scan(log_alpha, 0, _add)
    lgp = lg - log_alpha
    terms = tl.where(rows > cols, log_alpha[:, None], 0.0)  # [j, i] = log α_j for j > i
    segment = tl.associative_scan(terms, 0, _add)  # [t, i] = Σ_{i<j<=t} log α_j
    ra = tl.where(rows >= cols, tl.exp(tl.where(rows >= cols, segment, 0.0)), 0.0)
    before = segment - terms  # [t, i] = Σ_{i<j<t} log α_j
    pr = tl.where(rows > cols, tl.exp(tl.where(rows > cols, before, 0.0)), 0.0)
    return log_alpha, lg, lgp, ra, pr


@triton.jit
def _decays_backward(alpha, ra, pr, dlog, dlg, dlgp, dra, dpr, scratch, TINY: tl.constexpr, BLOCK_C: tl.constexpr):
    """dL/dα from the gradients of ``_decays``' outputs (``dlog``: what already reached log α).

    d log α_j = dlog_j + Σ_{t>=j} dlg_t + Σ_{t>j} dlgp_t + Σ_{i<j} Σ_{t>=j} (dRA ⊙ RA)[t, i]
                + Σ_{i<j} Σ_{t>j} (dPR ⊙ PR)[t, i]

    each as a direct sum over its own range. A strict sum written as the inclusive one minus its
    first term would cancel: for small α the first term (e.g. PR[j, j-1] = 1) dwarfs the rest
    (powers of α), and dividing by α at the end blows the rounding error up. So the PR terms are
    moved up one row (through ``scratch``, this program's BLOCK_C x BLOCK_C of global memory:
    registers cannot shift rows) and summed with the RA terms in one inclusive suffix scan.
    """
    rows = tl.arange(0, BLOCK_C)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    through_lg = _rowsum(tl.where(cols >= rows, dlg[None, :], 0.0))  # Σ_{t>=j} dlg_t
    through_lgp = _rowsum(tl.where(cols > rows, dlgp[None, :], 0.0))  # Σ_{t>j} dlgp_t
    tl.store(scratch + rows * BLOCK_C + cols, dpr * pr)
    tl.debug_barrier()  # every row written before any thread reads its neighbour's
    prev_terms_up = tl.load(scratch + (rows + 1) * BLOCK_C + cols, mask=(rows + 1 < BLOCK_C) & (cols >= 0), other=0.0)
    tl.debug_barrier()  # every row read before the next chunk overwrites it
    suffix = tl.associative_scan(dra * ra + prev_terms_up, 0, _add, reverse=True)
    through_ratios = _rowsum(tl.where(cols < rows, suffix, 0.0))
    dlog_alpha = dlog + through_lg + through_lgp + through_ratios
    return tl.where(alpha >= TINY, dlog_alpha / alpha, 0.0)  # no gradient where the clamp holds


@triton.jit
def _unit_lower_inverse(strict, BLOCK_C: tl.constexpr):
    """(I + strict)⁻¹ for ``strict`` strictly lower triangular, by forward substitution over rows:
    row i of the inverse is e_i - Σ_{j<i} strict[i, j] row_j."""
    rows = tl.arange(0, BLOCK_C)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    inverse = tl.where(rows == cols, 1.0, 0.0).to(strict.dtype)
    for i in range(1, BLOCK_C):
        coefficients = tl.reduce(tl.where(rows == i, strict, 0.0), 0, _add)  # strict[i, :]
        combined = tl.reduce(coefficients[:, None] * inverse, 0, _add)  # Σ_j strict[i, j] row_j
        inverse = tl.where(rows == i, inverse - combined[None, :], inverse)
    return inverse


@triton.jit
def _system_inverse(strict, saved, SAVED: tl.constexpr, BLOCK_C: tl.constexpr):
    """(I + strict)⁻¹: solved and written to ``saved`` (the forward), or read back (the backward)."""
    offsets = tl.arange(0, BLOCK_C)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    if SAVED:
        inverse = tl.load(saved + offsets)
    else:
        inverse = _unit_lower_inverse(strict, BLOCK_C)
        tl.store(saved + offsets, inverse)
    return inverse


@triton.jit
def _w2_step(eta2, eta1, norm_hid, slope, colsq, DELTA: tl.constexpr, CURVATURE_EPS: tl.constexpr):
    """κ = Σ_j silu'(pre_j)² |W1[:, j]|² and W2's step e2: η2 (1 - η1 |hid|²) / (κ + ε_κ) under the
    delta rule (curvature-normalised), η2 under DGD (κ unused)."""
    kappa = _rowsum(slope * slope * colsq[None, :])
    if DELTA:
        e2 = eta2 * (1.0 - eta1 * norm_hid) / (kappa + CURVATURE_EPS)
    else:
        e2 = eta2
    return kappa, e2


@triton.jit
def _key_system_backward(ks_inv, dr2, r2, slope, m, pre, s_pre, pr, gram_k, eta2, e2, gpe2, lower):
    """Backward of W2's update vectors r2 = KS⁻¹ rhs2, rhs2 = -e2 silu'(pre) m - gpe2 pre, KS's
    strictly lower part η2 PR ⊙ k kᵀ: dL/de2, dL/dη2 (through KS), dL/dgpe2, dL/dm, dL/dpre so
    far, silu''(pre), and what reaches PR and k kᵀ."""
    drhs2 = _dot(tl.trans(ks_inv), dr2)
    dks = tl.where(lower, -_dot(drhs2, tl.trans(r2)), 0.0)
    de2 = -_rowsum(slope * m * drhs2)
    deta2 = _rowsum(dks * pr * gram_k)
    dgpe2 = -_rowsum(pre * drhs2)
    dd2 = -e2[:, None] * drhs2
    curve = _silu_d2(pre, s_pre)
    dpre = -gpe2[:, None] * drhs2 + dd2 * m * curve
    return de2, deta2, dgpe2, dd2 * slope, dpre, curve, dks * eta2[:, None] * gram_k, dks * eta2[:, None] * pr


@triton.jit
def _curvature_backward(de2, eta, eta1, eta2, e2, norm_hid, kappa, hid, slope, curve, colsq, EPS: tl.constexpr,
                        CURVATURE_EPS: tl.constexpr):  # fmt: skip
    """Backward of W2's step under the delta rule, e2 = η2 f r with f = 1 - η1 |hid|² =
    1 - β |hid|² / (|hid|² + ε), r = 1 / (κ + ε_κ), κ = Σ_j silu'(pre_j)² |W1[:, j]|²: what
    reaches η2, β, hid, pre and |W1[:, j]|² (W1's gradient is then dcolsq ⊙ W1)."""
    inv1 = 1.0 / (norm_hid + EPS)
    r = 1.0 / (kappa + CURVATURE_EPS)
    df = de2 * eta2 * r
    dkappa = -de2 * e2 * r
    deta2 = de2 * (1.0 - eta1 * norm_hid) * r
    dbeta = -df * norm_hid * inv1
    dhid = (-2.0 * df * eta * EPS * inv1 * inv1)[:, None] * hid
    dpre = (2.0 * dkappa)[:, None] * slope * curve * colsq[None, :]
    dcolsq = 2.0 * tl.reduce(dkappa[:, None] * slope * slope, 0, _add)
    return deta2, dbeta, dhid, dpre, dcolsq


@triton.jit
def _retained(lgp, DELTA: tl.constexpr):
    """γ_prev - s: the delta rule (s = 1) keeps the start state's output, DGD (s = 0) does not."""
    if DELTA:
        after = tl.exp(lgp) - 1.0
    else:
        after = tl.exp(lgp)
    return after


@triton.jit
def _error(k, v, hw1, w1, w2, DELTA: tl.constexpr, SELF_TARGET: tl.constexpr):
    """d1 = c (k + hw1 - tgt): c = 1 (delta) or 2 (DGD); tgt = v + silu(v W2ᵀ) W1ᵀ ("self") or v."""
    if SELF_TARGET:
        a = _dot(v, tl.trans(w2))
        d1 = k + hw1 - v - _dot(a * _sigmoid(a), tl.trans(w1))
    else:
        d1 = k + hw1 - v
    if not DELTA:
        d1 = 2.0 * d1
    return d1


@triton.jit
def _chunk_values(q, k, v, eta, alpha, w1, w2, inverses, SAVED: tl.constexpr, TINY: tl.constexpr,
                  BLOCK_C: tl.constexpr, DELTA: tl.constexpr, SELF_TARGET: tl.constexpr, EPS: tl.constexpr,
                  CURVATURE_EPS: tl.constexpr):  # fmt: skip
    """One chunk from state (w1, w2): every value the forward makes and the backward reads.
    ``inverses`` points at this chunk's two saved system inverses (``_system_inverse``); ``eta``
    holds the gate β."""
    rows = tl.arange(0, BLOCK_C)[:, None]
    log_alpha, lg, lgp, ra, pr = _decays(alpha, TINY, BLOCK_C)
    gamma = tl.exp(lg)
    after = _retained(lgp, DELTA)  # γ_prev - s
    norm_k = _rowsum(k * k)
    eta2 = _layer_step(eta, norm_k, DELTA, EPS)
    gpe2 = eta2 * after
    pre = _dot(k, tl.trans(w2))
    s_pre = _sigmoid(pre)
    hid = pre * s_pre
    slope = _silu_d1(pre, s_pre)
    norm_hid = _rowsum(hid * hid)
    eta1 = _layer_step(eta, norm_hid, DELTA, EPS)
    gpe1 = eta1 * after
    colsq = tl.reduce(w1 * w1, 0, _add)  # |W1[:, j]|²
    kappa, e2 = _w2_step(eta2, eta1, norm_hid, slope, colsq, DELTA, CURVATURE_EPS)
    hw1 = _dot(hid, tl.trans(w1))
    d1 = _error(k, v, hw1, w1, w2, DELTA, SELF_TARGET)
    m = _dot(d1, w1)
    # Layer W2 (inputs k).
    gram_k = _dot(k, tl.trans(k))
    ks_inv = _system_inverse(eta2[:, None] * pr * gram_k, inverses, SAVED, BLOCK_C)
    r2 = _dot(ks_inv, -e2[:, None] * slope * m - gpe2[:, None] * pre)
    qk = _dot(q, tl.trans(k))
    zq = _dot(q, tl.trans(w2))
    z = gamma[:, None] * zq + _dot(ra * qk, r2)
    s_z = _sigmoid(z)
    hq = z * s_z
    # Layer W1 (inputs hid).
    gram = _dot(hid, tl.trans(hid))
    s1_inv = _system_inverse(eta1[:, None] * pr * gram, inverses + BLOCK_C * BLOCK_C, SAVED, BLOCK_C)
    r1 = _dot(s1_inv, -eta1[:, None] * d1 - gpe1[:, None] * hw1)
    p = _dot(hq, tl.trans(hid))
    oq = _dot(hq, tl.trans(w1))
    rho = tl.reduce(tl.where(rows == BLOCK_C - 1, ra, 0.0), 0, _add)  # γ_L / γ_i (padded rows keep α = 1)
    gamma_end = tl.exp(tl.reduce(log_alpha, 0, _add))
    return (lgp, gamma, after, ra, pr, gram_k, qk, pre, s_pre, slope, hid, hw1, d1, m, r2, zq, z, s_z, hq,
            gram, r1, p, oq, rho, gamma_end, norm_k, norm_hid, eta1, eta2, e2, gpe1, gpe2, kappa, colsq)  # fmt: skip


# Integer arguments Triton must not specialise on (it would compile a new binary whenever an int
# becomes 1 or a multiple of 16, i.e. for a new sequence length or chunk size); the block sizes
# are the compile-time constants.
RUNTIME_INTS = ["N", "C", "D", "DH"]


@triton.jit(do_not_specialize=RUNTIME_INTS)
def dgd_mlp_forward_kernel(
    Q, K, V, ETA, ALPHA, W1S, W2S, INVERSES, OUT,
    N, C, D, DH,
    TINY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    DELTA: tl.constexpr, SELF_TARGET: tl.constexpr, EPS: tl.constexpr, CURVATURE_EPS: tl.constexpr,
):  # fmt: skip
    """Inputs (I items, N chunks, C tokens): q, k, v (I, N, C, D); eta, alpha (I, N, C).
    W1S (I, N + 1, D, Dh), W2S (I, N + 1, Dh, D): index 0 holds the initial state; the kernel
    writes the state after each chunk into index n + 1. INVERSES (I, N, 2, BLOCK_C, BLOCK_C): the
    kernel writes each chunk's two system inverses (KS⁻¹, S1⁻¹) for the backward. OUT (I, N, C, D):
    the read-outs."""
    item = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, BLOCK_D)
    rh = tl.arange(0, BLOCK_H)
    tokens_mask = (rc < C)[:, None] & (rd < D)[None, :]
    w1_off = rd[:, None] * DH + rh[None, :]
    w1_mask = (rd < D)[:, None] & (rh < DH)[None, :]
    w2_off = rh[:, None] * D + rd[None, :]
    w2_mask = (rh < DH)[:, None] & (rd < D)[None, :]
    w1 = tl.load(W1S + item * (N + 1) * D * DH + w1_off, mask=w1_mask, other=0.0)
    w2 = tl.load(W2S + item * (N + 1) * DH * D + w2_off, mask=w2_mask, other=0.0)
    for n in range(N):
        chunk = item * N + n
        tokens_off = (chunk * C + rc)[:, None] * D + rd[None, :]
        q = tl.load(Q + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_first")
        k = tl.load(K + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_first")
        v = tl.load(V + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_first")
        eta = tl.load(ETA + chunk * C + rc, mask=rc < C, other=0.0)
        alpha = tl.load(ALPHA + chunk * C + rc, mask=rc < C, other=1.0)
        inverses = INVERSES + chunk * 2 * BLOCK_C * BLOCK_C
        (lgp, gamma, after, ra, pr, gram_k, qk, pre, s_pre, slope, hid, hw1, d1, m, r2, zq, z, s_z, hq,
         gram, r1, p, oq, rho, gamma_end, norm_k, norm_hid, eta1, eta2, e2, gpe1, gpe2, kappa,
         colsq) = _chunk_values(q, k, v, eta, alpha, w1, w2, inverses, False, TINY, BLOCK_C,
                                           DELTA, SELF_TARGET, EPS, CURVATURE_EPS)  # fmt: skip
        out = q + gamma[:, None] * oq + _dot(ra * p, r1)
        tl.store(OUT + tokens_off, out, mask=tokens_mask)
        w1 = gamma_end * w1 + _dot(tl.trans(rho[:, None] * r1), hid)
        w2 = gamma_end * w2 + _dot(tl.trans(rho[:, None] * r2), k)
        state = item * (N + 1) + n + 1
        tl.store(W1S + state * D * DH + w1_off, w1, mask=w1_mask)
        tl.store(W2S + state * DH * D + w2_off, w2, mask=w2_mask)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def dgd_mlp_backward_kernel(
    Q, K, V, ETA, ALPHA, W1S, W2S, INVERSES, DOUT, DW1, DW2, SCRATCH,
    DQ, DK, DV, DETA, DALPHA,
    N, C, D, DH,
    TINY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    DELTA: tl.constexpr, SELF_TARGET: tl.constexpr, EPS: tl.constexpr, CURVATURE_EPS: tl.constexpr,
):  # fmt: skip
    """Gradients of every input of the forward kernel. DW1 (I, D, Dh), DW2 (I, Dh, D) hold
    dL/d(end state) on entry and dL/d(initial state) on return; DQ.. DALPHA are written whole.
    SCRATCH (I, BLOCK_C, BLOCK_C): working memory.

    The inputs and states are loaded again where the chain rule reaches them instead of being
    kept from the recomputation: each tensor a product reads is staged in shared memory until its
    last product, and keeping them all would exceed an H100's 227 KB."""
    item = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, BLOCK_D)
    rh = tl.arange(0, BLOCK_H)
    rows = rc[:, None]
    cols = rc[None, :]
    lower = cols < rows
    tokens_mask = (rc < C)[:, None] & (rd < D)[None, :]
    w1_off = rd[:, None] * DH + rh[None, :]
    w1_mask = (rd < D)[:, None] & (rh < DH)[None, :]
    w2_off = rh[:, None] * D + rd[None, :]
    w2_mask = (rh < DH)[:, None] & (rd < D)[None, :]
    scratch = SCRATCH + item * BLOCK_C * BLOCK_C
    dw1 = tl.load(DW1 + item * D * DH + w1_off, mask=w1_mask, other=0.0)
    dw2 = tl.load(DW2 + item * DH * D + w2_off, mask=w2_mask, other=0.0)
    for back in range(N):
        n = N - 1 - back
        chunk = item * N + n
        w1_at = W1S + (item * (N + 1) + n) * D * DH + w1_off
        w2_at = W2S + (item * (N + 1) + n) * DH * D + w2_off
        tokens_off = (chunk * C + rc)[:, None] * D + rd[None, :]
        eta = tl.load(ETA + chunk * C + rc, mask=rc < C, other=0.0)
        alpha = tl.load(ALPHA + chunk * C + rc, mask=rc < C, other=1.0)
        # The recomputation's reads ask L2 to keep their lines (each is read again below, where the
        # chain rule reaches it); the second reads are the last. The different hints also keep
        # the compiler from merging the two reads into one value staged for the whole chunk.
        (lgp, gamma, after, ra, pr, gram_k, qk, pre, s_pre, slope, hid, hw1, d1, m, r2, zq, z, s_z, hq,
         gram, r1, p, oq, rho, gamma_end, norm_k, norm_hid, eta1, eta2, e2, gpe1, gpe2, kappa,
         colsq) = _chunk_values(
            tl.load(Q + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_last"),
            tl.load(K + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_last"),
            tl.load(V + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_last"),
            eta, alpha,
            tl.load(w1_at, mask=w1_mask, other=0.0, eviction_policy="evict_last"),
            tl.load(w2_at, mask=w2_mask, other=0.0, eviction_policy="evict_last"),
            INVERSES + chunk * 2 * BLOCK_C * BLOCK_C, True, TINY, BLOCK_C, DELTA, SELF_TARGET, EPS,
            CURVATURE_EPS)  # fmt: skip

        # W1' = γ_L W1 + (ρ r1)ᵀ hid.
        w1 = tl.load(w1_at, mask=w1_mask, other=0.0, eviction_policy="evict_first")
        dgamma_end = tl.reduce(_rowsum(w1 * dw1), 0, _add)
        dhid = _dot(rho[:, None] * r1, dw1)
        dlr1 = _dot(hid, tl.trans(dw1))
        dr1 = rho[:, None] * dlr1
        drho = _rowsum(r1 * dlr1)
        dw1_start = gamma_end * dw1
        # out = q + γ oq + RD r1, oq = hq W1ᵀ, RD = RA ⊙ P, P = hq hidᵀ.
        dout = tl.load(DOUT + tokens_off, mask=tokens_mask, other=0.0)
        dq = dout
        dgamma = _rowsum(oq * dout)
        doq = gamma[:, None] * dout
        drd = _dot(dout, tl.trans(r1))
        dr1 += _dot(tl.trans(ra * p), dout)
        dhq = _dot(doq, w1)
        dw1_start += _dot(tl.trans(doq), hq)
        dra = drd * p
        dp = drd * ra
        dhq += _dot(dp, hid)
        dhid += _dot(tl.trans(dp), hq)
        # r1 = S1⁻¹ rhs1, rhs1 = -η1 d1 - gpe1 hw1; S1's strictly lower part η1 PR ⊙ gram.
        s1_inv = tl.load(INVERSES + (chunk * 2 + 1) * BLOCK_C * BLOCK_C + rows * BLOCK_C + cols)
        drhs1 = _dot(tl.trans(s1_inv), dr1)
        ds1 = tl.where(lower, -_dot(drhs1, tl.trans(r1)), 0.0)
        deta1 = -_rowsum(d1 * drhs1) + _rowsum(ds1 * pr * gram)
        dgpe1 = -_rowsum(hw1 * drhs1)
        dd1 = -eta1[:, None] * drhs1
        dhw1 = -gpe1[:, None] * drhs1
        dpr = ds1 * eta1[:, None] * gram
        dgram = ds1 * eta1[:, None] * pr
        dhid += _dot(dgram + tl.trans(dgram), hid)
        # gpe1 = η1 (γ_prev - s), η1 = β / (|hid|² + ε) (delta rule).
        dbeta, dhid = _layer_step_backward(eta, eta1, norm_hid, hid, deta1 + dgpe1 * after, dhid, DELTA, EPS)
        # hq = silu(z), z = γ zq + KR r2, zq = q W2ᵀ, KR = RA ⊙ qk.
        dz = dhq * _silu_d1(z, s_z)
        dgamma += _rowsum(zq * dz)
        dzq = gamma[:, None] * dz
        dkr = _dot(dz, tl.trans(r2))
        dr2 = _dot(tl.trans(ra * qk), dz)
        # W2' = γ_L W2 + (ρ r2)ᵀ k.
        w2 = tl.load(w2_at, mask=w2_mask, other=0.0, eviction_policy="evict_first")
        k = tl.load(K + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_first")
        dgamma_end += tl.reduce(_rowsum(w2 * dw2), 0, _add)
        dk = _dot(rho[:, None] * r2, dw2)
        dlr2 = _dot(k, tl.trans(dw2))
        dr2 += rho[:, None] * dlr2
        drho += _rowsum(r2 * dlr2)
        dw2_start = gamma_end * dw2
        q = tl.load(Q + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_first")
        dq += _dot(dzq, w2)
        dw2_start += _dot(tl.trans(dzq), q)
        # r2 = KS⁻¹ rhs2, rhs2 = -e2 silu'(pre) m - gpe2 pre; KS's strictly lower part η2 PR ⊙ k kᵀ.
        ks_inv = tl.load(INVERSES + chunk * 2 * BLOCK_C * BLOCK_C + rows * BLOCK_C + cols)
        de2, deta2, dgpe2, dm, dpre, curve, dpr2, dgram_k = _key_system_backward(
            ks_inv, dr2, r2, slope, m, pre, s_pre, pr, gram_k, eta2, e2, gpe2, lower)
        dpr += dpr2
        if DELTA:  # W2's curvature-normalised step; e2 = η2 under DGD
            deta2_e, dbeta_e, dhid_e, dpre_e, dcolsq = _curvature_backward(
                de2, eta, eta1, eta2, e2, norm_hid, kappa, hid, slope, curve, colsq, EPS, CURVATURE_EPS)
            deta2 += deta2_e
            dbeta += dbeta_e
            dhid += dhid_e
            dpre += dpre_e
            dw1_start += dcolsq[None, :] * w1
        else:
            deta2 += de2
        # m = d1 W1; d1 = c (k + hw1 - tgt) (_error).
        dd1 += _dot(dm, tl.trans(w1))
        if not DELTA:
            dd1 = 2.0 * dd1
        dk += dd1
        dhw1 += dd1
        dv = -dd1
        # d1 (and silu(a)) once more from the inputs read again here, rather than kept from the
        # recomputation: tiles less staged in shared memory across the chunk.
        v = tl.load(V + tokens_off, mask=tokens_mask, other=0.0, eviction_policy="evict_first")
        dw1_start += _dot(tl.trans(_error(k, v, hw1, w1, w2, DELTA, SELF_TARGET)), dm)  # d1ᵀ dm
        if SELF_TARGET:  # tgt = v + silu(a) W1ᵀ, a = v W2ᵀ
            a = _dot(v, tl.trans(w2))
            s_a = _sigmoid(a)
            dsa = -_dot(dd1, w1)
            dw1_start -= _dot(tl.trans(dd1), a * s_a)
            da = dsa * _silu_d1(a, s_a)
            dv += _dot(da, w2)
            dw2_start += _dot(tl.trans(da), v)
        # hw1 = hid W1ᵀ, hid = silu(pre), pre = k W2ᵀ.
        dhid += _dot(dhw1, w1)
        dw1_start += _dot(tl.trans(dhw1), hid)
        dpre += dhid * _silu_d1(pre, s_pre)
        dk += _dot(dpre, w2)
        dw2_start += _dot(tl.trans(dpre), k)
        # k kᵀ (both factors), q kᵀ.
        dk += _dot(dgram_k + tl.trans(dgram_k), k)
        dra += dkr * qk
        dqk = dkr * ra
        dq += _dot(dqk, k)
        dk += _dot(tl.trans(dqk), q)
        # gpe2 = η2 (γ_prev - s), η2 = β / (|k|² + ε) (delta rule).
        dbeta2, dk = _layer_step_backward(eta, eta2, norm_k, k, deta2 + dgpe2 * after, dk, DELTA, EPS)
        dbeta += dbeta2
        # γ = exp(lg), γ_prev = exp(lgp) (in gpe_l = η_l (γ_prev - s)), γ_L = exp(Σ log α), ρ = RA[last, :].
        dlgp = (dgpe1 * eta1 + dgpe2 * eta2) * tl.exp(lgp)
        dra += tl.where(rows == BLOCK_C - 1, drho[None, :], 0.0)
        dlog = tl.full([BLOCK_C], 0.0, eta.dtype) + dgamma_end * gamma_end
        dalpha = _decays_backward(alpha, ra, pr, dlog, dgamma * gamma, dlgp, dra, dpr, scratch, TINY, BLOCK_C)

        tl.store(DQ + tokens_off, dq, mask=tokens_mask)
        tl.store(DK + tokens_off, dk, mask=tokens_mask)
        tl.store(DV + tokens_off, dv, mask=tokens_mask)
        tl.store(DETA + chunk * C + rc, dbeta, mask=rc < C)
        tl.store(DALPHA + chunk * C + rc, dalpha, mask=rc < C)
        dw1 = dw1_start
        dw2 = dw2_start
    tl.store(DW1 + item * D * DH + w1_off, dw1, mask=w1_mask)
    tl.store(DW2 + item * DH * D + w2_off, dw2, mask=w2_mask)
