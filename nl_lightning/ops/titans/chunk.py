"""Chunk-parallel Titans memory: the same recurrence as ``naive.py``, a chunk of tokens at a time.

Inside a chunk every gradient is taken at the chunk-start state ``(W0, S0)``, so token j's
gradient is a known rank-1 matrix ``G_j = u_j x_j^T`` (``common.loss_grad_factors``). The
token-by-token recurrence ``S_i = eta_i S_{i-1} - theta_i G_i``, ``W_i = (1 - alpha_i) W_{i-1} + S_i``
is linear, so it unrolls to (``coefficients.py`` computes the gate-only coefficients)::

    W_i = beta_i W0 + c_i S0 - sum_{j<=i} mix_ij G_j          S_end = A_L S0 - sum_j surprise_j G_j

and the read-out of every chunk token needs no per-token weight matrix:
``W_i z_i = beta_i W0 z_i + c_i S0 z_i - sum_j mix_ij (x_j . z_i) u_j`` with ``mix_ij = P_ij theta_j``.

The only sequential part is the state hand-over from chunk to chunk (``*_chunk_step``): the
gradient factors at the chunk-start weights and the end state (for the linear memory the whole
loop is one autograd op with its reverse loop written out, ``_LinearHandOver``). The read-outs
feed nothing back into the state, so they wait for the loop and run for all chunks at once as a
few large batched matmuls against the stacked chunk-start states (``_read_out``); likewise everything that
depends only on inputs and gates is built for all chunks before the loop. Per-chunk inputs are
views of those batched tensors, not copies. The 2 of ``grad ||M(k) - v||^2`` is folded into
the coefficients, so the steps work with half-gradients ``u = M(k) - v``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .coefficients import ChunkCoefficients, chunk_coefficients
from nl_lightning.ops.contract import MemoryState

__all__ = ["ChunkCoefficients", "chunk_coefficients", "chunk_titans_memory", "linear_chunk_step", "mlp_chunk_step"]


def _chunked(t: Tensor, chunk_size: int) -> Tensor:
    """``(B, H, T, D)`` -> ``(B, H, N, C, D)``, zero-padding the last chunk."""
    B, H, T, D = t.shape
    N = -(-T // chunk_size)
    # Contiguous either way (head-split inputs are transposed views): every per-chunk slice then
    # flattens (B, H) without a copy.
    t = F.pad(t, (0, 0, 0, N * chunk_size - T)) if N * chunk_size != T else t.contiguous()
    return t.view(B, H, N, chunk_size, D)


def _per_chunk(t: Tensor) -> tuple[Tensor, ...]:
    """``(B, H, N, ...)`` -> N views ``(B*H, ...)``. Views, not copies: batched matmuls take
    the chunk stride as the batch stride, and the backward is one stack."""
    return t.flatten(0, 1).unbind(1)


def _stacked(per_chunk: list[Tensor], B: int, H: int) -> Tensor:
    """N tensors ``(B*H, ...)`` -> ``(B, H, N, ...)``."""
    return torch.stack(per_chunk, dim=1).unflatten(0, (B, H))


def _hand_over(
    W: Tensor, S: Tensor, u: Tensor, minus_mix_x: Tensor, minus_surprise_x: Tensor, decay: Tensor
) -> tuple[Tensor, Tensor]:
    """End state of one weight from its chunk-start state and gradient factors ``G_j = 2 u_j x_j^T``:
    ``W_end = beta_L W + c_L S - u^T (2 mix_L o x)``, ``S_end = A_L S - u^T (2 surprise o x)``
    (elementwise decay: a ``(2D, 2D)`` transition matmul costs more than the update at D >= 32)."""
    beta, carry, momentum = decay.unbind(1)
    W_end = torch.baddbmm(torch.addcmul(beta * W, carry, S), u.mT, minus_mix_x)
    S_end = torch.baddbmm(momentum * S, u.mT, minus_surprise_x)
    return W_end, S_end


def _read_out(z: Tensor, x: Tensor, u: Tensor, W: Tensor, S: Tensor, cf: ChunkCoefficients) -> Tensor:
    """``W_i z_i`` for every token of every chunk (``(B, H, N, C, D)`` inputs, ``W, S`` the
    stacked chunk-start states): ``beta_i W0 z_i + c_i S0 z_i - sum_j 2 P_ij theta_j (x_j . z_i) u_j``.
    """
    y = (cf.beta.unsqueeze(-1) * z) @ W.mT + (cf.carry.unsqueeze(-1) * z) @ S.mT
    # -2 theta_j scales the C x D factor x, not the C x C scores: two fewer C x C passes (the
    # product with theta forward, its gradient backward) than scoring with mix = P o theta.
    scores = cf.decay_mix * (z @ ((-2 * cf.theta).unsqueeze(-1) * x).mT)
    return y + scores @ u


def _end_weights(cf: ChunkCoefficients) -> tuple[Tensor, Tensor]:
    """``-2 mix_L`` and ``-2 surprise`` per token, ``(B, H, N, C, 1)``, for ``_hand_over``."""
    return (-2 * cf.mix_end).unsqueeze(-1), (-2 * cf.surprise_end).unsqueeze(-1)


def _decays(cf: ChunkCoefficients) -> Tensor:
    """``(beta_L, c_L, A_L)`` per chunk, ``(B, H, N, 3, 1, 1)``, for ``_hand_over``."""
    return torch.stack([cf.beta_end, cf.carry_end, cf.momentum_end], -1)[..., None, None]


def _start(start: MemoryState, index: int) -> tuple[Tensor, Tensor]:
    return start.weights[index].flatten(0, 1), start.momentum[index].flatten(0, 1)


def linear_chunk_step(
    W: Tensor, S: Tensor, k: Tensor, v: Tensor, minus_mix_k: Tensor, minus_surprise_k: Tensor, decay: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """State hand-over of one chunk of the linear memory, all tensors ``(B*H, ...)``: the
    half-gradients ``u = W0 k - v`` at the chunk-start weights, and the end state."""
    u = torch.baddbmm(v, k, W.mT, beta=-1)
    return (u, *_hand_over(W, S, u, minus_mix_k, minus_surprise_k, decay))


class _LinearHandOver(torch.autograd.Function):
    """The chunk-to-chunk loop of the linear memory as one autograd op, tensors ``(B*H, N, ...)``.

    Returns the chunk-start states ``Ws, Ss``, the half-gradients ``us`` and the final state.
    The forward runs ``step`` (eager or compiled) chunk by chunk; the backward is the reverse loop
    written out. Through autograd every chunk would be about 15 recorded nodes whose engine
    overhead outweighs their (D x D) work; written out, only the gradients that feed the next
    (earlier) chunk are sequential, 6 ops a chunk::

        du_n = gu_n + mk_n dW_{n+1}^T + sk_n dS_{n+1}^T        (mk/sk: minus_mix_k/minus_surprise_k)
        dW_n = gW_n + b_n dW_{n+1} + du_n^T k_n                dS_n = gS_n + c_n dW_{n+1} + a_n dS_{n+1}

    and everything else (the gradients of k, v, mk, sk and the decays) is a few batched ops
    over all chunks after the loop.
    """

    @staticmethod
    def forward(
        ctx, W: Tensor, S: Tensor, k: Tensor, v: Tensor, mk: Tensor, sk: Tensor, decay: Tensor, step: Callable
    ):
        saved = []
        for inputs in zip(*(t.unbind(1) for t in (k, v, mk, sk, decay))):
            u, W_end, S_end = step(W, S, *inputs)
            saved.append((W, S, u))
            W, S = W_end, S_end
        Ws, Ss, us = (torch.stack(ts, 1) for ts in zip(*saved))
        ctx.save_for_backward(Ws, Ss, us, k, mk, sk, decay)
        return Ws, Ss, us, W, S

    @staticmethod
    @once_differentiable
    def backward(ctx, gWs: Tensor, gSs: Tensor, gus: Tensor, dW: Tensor, dS: Tensor):
        Ws, Ss, us, k, mk, sk, decay = ctx.saved_tensors
        N = k.shape[1]
        b, c, a = decay.unbind(2)
        dWs_next, dSs_next, dus = [None] * N, [None] * N, [None] * N
        for n in range(N - 1, -1, -1):
            dWs_next[n], dSs_next[n] = dW, dS
            du = torch.baddbmm(gus[:, n], mk[:, n], dW.mT).baddbmm_(sk[:, n], dS.mT)
            dW, dS = (
                torch.addcmul(gWs[:, n], b[:, n], dW).baddbmm_(du.mT, k[:, n]),
                torch.addcmul(gSs[:, n], c[:, n], dW).addcmul_(a[:, n], dS),
            )
            dus[n] = du
        dW_next, dS_next, du = (torch.stack(ts, 1) for ts in (dWs_next, dSs_next, dus))
        # W_{n+1} = b W_n + c S_n + u_n^T mk_n,  S_{n+1} = a S_n + u_n^T sk_n,  u_n = k_n W_n^T - v_n
        grad_decay = torch.stack(
            [(dW_next * Ws).sum((-2, -1)), (dW_next * Ss).sum((-2, -1)), (dS_next * Ss).sum((-2, -1))], 2
        )[..., None, None]
        return dW, dS, du @ Ws, -du, us @ dW_next, us @ dS_next, grad_decay, None


def _linear_memory(
    q: Tensor, k: Tensor, v: Tensor, cf: ChunkCoefficients, start: MemoryState, C: int, step: Callable
):
    B, H, T, _ = q.shape
    qs, ks, vs = (_chunked(t, C) for t in (q, k, v))
    minus_mix, minus_surprise = _end_weights(cf)
    per_chunk = (t.flatten(0, 1) for t in (ks, vs, minus_mix * ks, minus_surprise * ks, _decays(cf)))
    Ws, Ss, us, W, S = _LinearHandOver.apply(*_start(start, 0), *per_chunk, step)
    Ws, Ss, us = (t.unflatten(0, (B, H)) for t in (Ws, Ss, us))
    y = _read_out(qs, ks, us, Ws, Ss, cf).flatten(2, 3)[:, :, :T]
    return y, MemoryState((W.unflatten(0, (B, H)),), (S.unflatten(0, (B, H)),))


def mlp_chunk_step(
    W1: Tensor,
    S1: Tensor,
    W2: Tensor,
    S2: Tensor,
    k: Tensor,
    k_minus_v: Tensor,
    minus_mix_k: Tensor,
    minus_surprise_k: Tensor,
    minus_mix: Tensor,
    minus_surprise: Tensor,
    decay: Tensor,
) -> tuple[Tensor, ...]:
    """State hand-over of one chunk of the MLP memory ``M(z) = z + W1 silu(W2 z)``, all tensors
    ``(B*H, ...)``. Returns the gradient factors the read-outs need (``u1, u2, a``) and the end
    state ``W1, S1, W2, S2``."""
    # Loss gradients at the chunk-start weights, halved (the 2 is in the coefficients):
    # u1 = M(k) - v for W1 (input a = silu(W2 k)), u2 = (W1^T u1) o silu'(W2 k) for W2 (input k).
    pre = torch.bmm(k, W2.mT)
    s = torch.sigmoid(pre)
    a = pre * s
    u1 = torch.baddbmm(k_minus_v, a, W1.mT)
    u2 = torch.bmm(u1, W1) * (s + a * (1 - s))
    W2_end, S2_end = _hand_over(W2, S2, u2, minus_mix_k, minus_surprise_k, decay)
    W1_end, S1_end = _hand_over(W1, S1, u1, minus_mix * a, minus_surprise * a, decay)
    return u1, u2, a, W1_end, S1_end, W2_end, S2_end


def _mlp_memory(
    q: Tensor, k: Tensor, v: Tensor, cf: ChunkCoefficients, start: MemoryState, C: int, step: Callable
):
    B, H, T, _ = q.shape
    qs, ks, vs = (_chunked(t, C) for t in (q, k, v))
    minus_mix, minus_surprise = _end_weights(cf)
    per_chunk = zip(*map(_per_chunk, (
        ks, ks - vs, minus_mix * ks, minus_surprise * ks, minus_mix, minus_surprise, _decays(cf),
    )))  # fmt: skip
    state = (*_start(start, 0), *_start(start, 1))
    saved = []
    for inputs in per_chunk:
        u1, u2, a, *end = step(*state, *inputs)
        saved.append((*state, u1, u2, a))
        state = end
    W1s, S1s, W2s, S2s, u1s, u2s, a_s = (_stacked(ts, B, H) for ts in zip(*saved))
    # The read-outs feed nothing back into the state, so they run for all chunks at once:
    # the inner layer h_i = W2_i q_i, then the outer one on silu(h_i).
    h = _read_out(qs, ks, u2s, W2s, S2s, cf)
    out = _read_out(F.silu(h), a_s, u1s, W1s, S1s, cf)
    y = q + out.flatten(2, 3)[:, :, :T]
    W1, S1, W2, S2 = (t.unflatten(0, (B, H)) for t in state)
    return y, MemoryState((W1, W2), (S1, S2))


def run_chunks(
    kind: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coefficients: ChunkCoefficients,
    start: MemoryState,
    chunk_size: int,
    step: Callable | None = None,
) -> tuple[Tensor, MemoryState]:
    """Run every chunk from ``start``; ``step`` replaces the kind's eager chunk step (``compiled.py``
    passes the compiled one)."""
    if kind == "linear":
        return _linear_memory(q, k, v, coefficients, start, chunk_size, step or linear_chunk_step)
    return _mlp_memory(q, k, v, coefficients, start, chunk_size, step or mlp_chunk_step)


def chunk_titans_memory(q, k, v, theta, eta, alpha, start: MemoryState, *, kind: str, chunk_size: int):
    """Chunk-parallel Titans memory (the op contract's signature, ``ops/contract.py``)."""
    C = min(chunk_size, q.shape[2])  # one chunk longer than the sequence == the whole sequence
    coefficients = chunk_coefficients(theta, eta, alpha, C)
    return run_chunks(kind, q, k, v, coefficients, start, C)
