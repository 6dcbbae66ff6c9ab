"""Chunk-parallel DGD memory: same semantics as ``naive.py``, matmuls inside each chunk.

Within a chunk every quantity the gradient needs (target, error, layer inputs) comes from the
chunk-start state, so each layer's update, under either write rule, is a gated delta-rule
recurrence with *known* additive terms:

    S_t = S_{t-1} (alpha_t I - eta_t x_t x_tᵀ) + u_t x_tᵀ

with u_t = -2 eta_t g_t for the DGD rule and, for the delta rule, eta_t = beta_t / (||x_t||² + eps)
and u_t = eta_t (y_t - g_t) (``naive.py``; y, g: the layer's output and error at the chunk start).

Write S_t = gamma_t S_0 + sum_{i<=t} (gamma_t / gamma_i) r_i x_iᵀ with gamma_t = prod_{j<=t} alpha_j
and r_t = u_t - eta_t S_{t-1} x_t (the update vector that actually lands). Substituting S_{t-1} into
r_t gives a unit lower-triangular system (the WY / UT form of DeltaNet chunking):

    r_t + eta_t sum_{i<t} (gamma_{t-1}/gamma_i) (x_t·x_i) r_i = u_t - eta_t gamma_{t-1} S_0 x_t

One triangular solve gives every r_t; outputs and the end-of-chunk state are then matmuls. Decay
ratios are exponentials of log-space segment sums, masked *before* the exp, so only ratios <= 1 are
ever built: nothing divides by a cumulative product that may have underflowed.

The MLP memory M(z) = z + W1 silu(W2 z) runs two such recurrences per chunk: W2 on inputs k (read
out at q), then W1 on inputs h = silu(W2_{start} k) (read out at silu(W2_t q_t)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from nl_lightning.ops.activations import silu_grad
from nl_lightning.ops.contract import MemoryState
from nl_lightning.ops.dgd.naive import nlms_step, w2_error_scale


def _masked_exp(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Masking first keeps exp away from the entries above the diagonal, so neither the forward
    # nor the backward ever sees inf.
    return torch.where(mask, log_ratio, float("-inf")).exp()


def chunk_decays(alpha: torch.Tensor):
    """Log cumulative retention of one chunk and the decay-ratio matrices built from it.

    Every log-ratio is a direct sum of the log(alpha_j) it covers (a segment sum, as in Mamba-2's
    ``segsum``), never a difference of two cumulative sums. A difference would be exact in the
    forward but its backward cancels O(1) terms to get d/dlog(alpha) = alpha d/dalpha, which for
    small alpha leaves a rounding error that 1/alpha then blows up in the gradient w.r.t. alpha.
    """
    length = alpha.shape[-1]
    # alpha is expected in (0, 1]; the clamp only keeps an exact 0 (e.g. an underflowed sigmoid)
    # from becoming log 0 = -inf.
    log_alpha = alpha.clamp_min(torch.finfo(alpha.dtype).tiny).log()
    log_gamma = log_alpha.cumsum(-1)  # log gamma_t = sum_{j<=t} log alpha_j
    log_gamma_prev = F.pad(log_gamma[..., :-1], (1, 0))  # log gamma_{t-1}, 0 before the chunk
    ones = torch.ones(length, length, dtype=torch.bool, device=alpha.device)
    # segment[t, i] = sum_{i<j<=t} log alpha_j = log(gamma_t / gamma_i) for t >= i.
    terms = torch.where(ones.tril(-1), log_alpha[..., :, None], 0.0)  # [j, i] = log alpha_j if j > i
    segment = terms.cumsum(-2)
    # gamma_t / gamma_i for i <= t: how much of r_i is left in the state after token t.
    ratio = _masked_exp(segment, ones.tril())
    # gamma_{t-1} / gamma_i for i < t: how much of r_i is left when token t reads the state. It is
    # the ratio shifted down one row (row t-1 is already 0 for i > t-1), so it needs no second
    # mask and exp.
    prev_ratio = F.pad(ratio[..., :-1, :], (0, 0, 1, 0))
    return log_gamma, log_gamma_prev, prev_ratio, ratio


class KeyTerms(NamedTuple):
    """What one chunk needs that depends only on q, k and the gates, shapes (B, H, [N,] C[, C]).

    ``chunk_dgd_memory`` builds these for every chunk at once (a few large batched ops instead of
    one small set per chunk); only the state hand-over stays sequential.
    """

    decays: tuple  # ``chunk_decays(alpha)``
    k_eta: torch.Tensor  # the step of the layer whose inputs are the keys (rule "delta": beta / (||k||² + eps))
    k_system: torch.Tensor  # the UT system of that layer
    k_read: torch.Tensor  # ratio * (q kᵀ): how token t's read-out sees the keys of the chunk


def delta_system(x, eta, decays):
    """Unit lower-triangular system ``I + eta_t (gamma_{t-1}/gamma_i) (x_t·x_i)`` of the UT form."""
    prev_ratio = decays[2]
    eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
    return eye + eta[..., :, None] * prev_ratio * (x @ x.mT)


def layer_step(eta, x, rule):
    """The step of a layer with inputs x: the gate itself (DGD), or ``naive.nlms_step`` (delta rule)."""
    return eta if rule == "dgd" else nlms_step(eta, x)


def key_terms(q, k, eta, alpha, rule="dgd") -> KeyTerms:
    """``KeyTerms`` of chunks of q, k (..., C, D) and gates (..., C)."""
    decays = chunk_decays(alpha)
    k_eta = layer_step(eta, k, rule)
    return KeyTerms(decays, k_eta, delta_system(k, k_eta, decays), decays[3] * (q @ k.mT))


def additive_terms(eta, y, g, rule):
    """u_t of the recurrence for a layer with step ``eta`` (its ``layer_step``), chunk-start
    outputs y and errors g: -2 eta g (DGD) or eta (y - g) (delta rule)."""
    if rule == "dgd":
        return -2 * eta[..., None] * g
    return eta[..., None] * (y - g)


def solve_updates(system, u, eta, decays, x_s0):
    """The update vectors r_t that land in the state (module docstring), for all t of the chunk.

    ``x_s0`` is S_0 x_t for every t (``x @ s0.mT``); the MLP step has it already as a layer's
    pre-activation, so it is passed in rather than recomputed.
    """
    log_gamma_prev = decays[1]
    rhs = u - (eta * log_gamma_prev.exp())[..., None] * x_s0
    return torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)


def end_state(s0, x, r, decays):
    """S_L = gamma_L S_0 + sum_i (gamma_L / gamma_i) r_i x_iᵀ; gamma_L / gamma_i is the ratio's last row."""
    log_gamma, ratio = decays[0], decays[3]
    return log_gamma[..., -1:].exp()[..., None] * s0 + (r * ratio[..., -1, :, None]).mT @ x


def _gated_delta_chunk(s0, x, u, q, eta, decays, x_s0, system, read):
    """One chunk of S_t = S_{t-1}(alpha_t I - eta_t x_t x_tᵀ) + u_t x_tᵀ.

    Args:
        s0: (B, H, Dout, Din) state before the chunk.
        x, q: (B, H, L, Din) layer inputs and read-out queries.
        u: (B, H, L, Dout) additive update vectors.
        eta: (B, H, L).
        decays: ``chunk_decays(alpha)`` for this chunk.
        x_s0: x @ s0.mT; system: ``delta_system(x, eta, decays)``; read: ratio * (q @ x.mT).

    Returns:
        (S_t q_t for every t in the chunk, (B, H, L, Dout); S_L).
    """
    r = solve_updates(system, u, eta, decays, x_s0)
    out = decays[0].exp()[..., None] * (q @ s0.mT) + read @ r
    return out, end_state(s0, x, r, decays)


def linear_chunk_step(state, q, k, v, eta, terms: KeyTerms, rule="dgd", target="self"):
    """One chunk of the linear memory M(z) = W z. Shapes as in ``chunk_dgd_memory``, T -> L."""
    (w,) = state
    k_w = k @ w.mT  # outputs y = W k at the chunk-start state
    goal = v @ w.mT if target == "self" else v  # v̂ = W v, or v
    u = additive_terms(terms.k_eta, k_w, k_w - goal, rule)  # error g = W k - v̂
    o, w = _gated_delta_chunk(w, k, u, q, terms.k_eta, terms.decays, k_w, terms.k_system, terms.k_read)
    return o, (w,)


def mlp_gradient_factors(w1, w2, k, v, target="self"):
    """Inner-loss terms at the chunk-start state (the MLP rows of ``naive._mlp_token``).

    Returns (pre, hidden, hidden_w1, g1, g2): W2's outputs k W2ᵀ, W1's inputs, W1's outputs
    (= S_0 x for each layer, reused by the solve) and the errors ∂(½L)/∂(W1 h), ∂(½L)/∂(W2 k).
    """
    pre = k @ w2.mT
    hidden = F.silu(pre)  # W1's layer inputs, at the chunk-start state
    hidden_w1 = hidden @ w1.mT
    goal = v + F.silu(v @ w2.mT) @ w1.mT if target == "self" else v  # v̂ = M(v), or v
    g1 = k + hidden_w1 - goal  # ∂(½L)/∂(W1 h)
    g2 = silu_grad(pre) * (g1 @ w1)  # ∂(½L)/∂(W2 k)
    return pre, hidden, hidden_w1, g1, g2


def mlp_chunk_step(state, q, k, v, eta, terms: KeyTerms, rule="dgd", target="self"):
    """One chunk of the MLP memory M(z) = z + W1 silu(W2 z). Shapes as in ``chunk_dgd_memory``."""
    w1, w2 = state
    pre, hidden, hidden_w1, g1, g2 = mlp_gradient_factors(w1, w2, k, v, target)
    decays = terms.decays  # both layers share alpha_t, so they share the decays
    eta1 = layer_step(eta, hidden, rule)
    if rule == "delta":  # W2 corrects the error W1's write leaves, curvature-normalised (naive.py)
        g2 = g2 * w2_error_scale(eta, hidden, pre, w1.pow(2).sum(-2).unsqueeze(-2))[..., None]
    z, w2 = _gated_delta_chunk(
        w2, k, additive_terms(terms.k_eta, pre, g2, rule), q, terms.k_eta, decays, pre, terms.k_system,
        terms.k_read,
    )
    h_q = F.silu(z)
    o, w1 = _gated_delta_chunk(
        w1, hidden, additive_terms(eta1, hidden_w1, g1, rule), h_q, eta1, decays, hidden_w1,
        delta_system(hidden, eta1, decays), decays[3] * (h_q @ hidden.mT),
    )
    return q + o, (w1, w2)


CHUNK_STEPS = {"linear": linear_chunk_step, "mlp": mlp_chunk_step}


def chunk_dgd_memory(
    q, k, v, eta, alpha, start: MemoryState, *, kind: str, chunk_size: int, rule="dgd", target="self", step=None,
    chunk_loop=None,
):
    """Chunk-parallel DGD memory; arguments and returns as in ``naive_dgd_memory``.

    ``step`` replaces the per-chunk function (``compiled.py`` passes a compiled one). ``chunk_loop``
    replaces everything after the padding: ``chunk_loop(state, q, k, v, eta, alpha)`` with inputs
    split into chunks, (B, H, N, C, ...), returns (read-outs (B, H, N, C, D), end weights)
    (``cpu.py`` passes its C++ loop); such a loop carries its own rule and target, and
    ``rule``/``target`` here are then not read.
    """
    step = CHUNK_STEPS[kind] if step is None else step
    state = tuple(start.weights)
    batch, heads, length, _ = q.shape
    # A sequence shorter than the chunk is one chunk either way; shrinking C saves the padding.
    chunk_size = min(chunk_size, length)
    pad = -length % chunk_size
    if pad:
        # Padded tokens have eta = 0 and alpha = 1: the update is the identity, exactly, so the
        # final partial chunk can use the same (compiled) full-size step as the others.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        eta = F.pad(eta, (0, pad), value=0.0)
        alpha = F.pad(alpha, (0, pad), value=1.0)
    n_chunks = (length + pad) // chunk_size
    # One copy each, if needed: head-split inputs are (B, T, H, D) memory seen as (B, H, T, D),
    # and in that layout the chunk matmuls copy their operands and every elementwise op and
    # triangular solve on them runs strided (HOPE's main memory, B=4, H=4, T=1024, D=48:
    # fwd+bwd 1.1x faster with the copies, 1 thread).
    q, k, v, eta, alpha = (x.contiguous() for x in (q, k, v, eta, alpha))
    q, k, v = (x.unflatten(2, (n_chunks, chunk_size)) for x in (q, k, v))
    eta, alpha = (x.unflatten(2, (n_chunks, chunk_size)) for x in (eta, alpha))
    if chunk_loop is not None:
        o, state = chunk_loop(state, q, k, v, eta, alpha)
        return o.flatten(2, 3)[:, :, :length], MemoryState(state)
    terms = key_terms(q, k, eta, alpha, rule)  # every chunk at once
    # unbind, not slicing chunk by chunk: the backward of one unbind stacks all chunk gradients
    # once, whereas each slice's backward writes into a zero tensor of the full size, which makes
    # the backward quadratic in the number of chunks.
    per_chunk_terms = [
        KeyTerms(decays, k_eta, system, read)
        for *decays, k_eta, system, read in zip(
            *(x.unbind(2) for x in (*terms.decays, terms.k_eta, terms.k_system, terms.k_read))
        )
    ]
    outputs = []
    for chunk in zip(*(x.unbind(2) for x in (q, k, v, eta)), per_chunk_terms):
        o, state = step(state, *chunk, rule, target)
        outputs.append(o)
    return torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :length], MemoryState(state)
