"""Continuum Memory System: a chain of MLP levels, each updated on its own timescale (SPEC §2).

``y = MLP^{(f_K)}(… MLP^{(f_1)}(o))``. Two timescales apply:

(a) training steps: level ℓ's parameters carry a ``period`` C(ℓ); the ``NestedScheduler`` callback
    (or a level-aware optimizer) changes them only every C(ℓ) optimizer steps, with the sum of
    the gradients since the last change. The periods travel as parameter-group metadata.
(b) in context (optional, ``context_periods``): level ℓ's down projection carries a per-sequence
    fast delta Δ_ℓ, updated every C(ℓ) tokens with the summed gradient of a local loss, and a
    final partial chunk is flushed into the returned state.

The local loss of (b) is next-input prediction: the level's output at token t, ``x_t + f(x_t)``,
predicts the next residual-stream input ``x_{t+1}``, ``L_t = ‖x_t + f(x_t) − x_{t+1}‖²``. It is
computable causally (the pair (t, t+1) is complete at token t+1) and, since f is fixed within a
chunk, every gradient is taken at the weights current when it was computed — exactly the CMS
rule ``θ_{i+1} = θ_i − Σ_t η ∇L(θ_t; x_t)`` every C(ℓ) tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nl_lightning.models.layers import RMSNorm, SwiGLU


class CMSLevel(nn.Module):
    """One level: pre-norm residual SwiGLU MLP."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))

    def forward_in_context(
        self, x: torch.Tensor, period: int, lr: float, delta: torch.Tensor | None = None, impl: str = "solve"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Level output with a fast delta on the down projection, updated every ``period`` tokens.

        x: (B, T, d); delta: (B, d, hidden) to continue a sequence (zeros otherwise). Returns the
        output and the delta after the last token, the final partial chunk included. The update
        is ``Δ ← Δ − (lr / period) Σ_pairs 2 e_t a_tᵀ`` over the pairs (t, t+1) whose target
        t+1 lies in the chunk, where a_t is the level's hidden activation and e_t the
        prediction error; dividing by the period keeps one chunk's step size independent of C.

        ``impl``: "solve" (default) computes blocks of chunks at once (``_in_context_solve``);
        "loop" walks the chunks one by one, the reference it equals.
        """
        batch, length, dim = x.shape
        hidden = _swiglu_hidden(self.mlp, self.norm(x))
        base = self.mlp.down(hidden)
        if delta is None:
            delta = x.new_zeros(batch, dim, hidden.shape[-1])
        if impl == "solve":
            return _in_context_solve(x, x + base, hidden, delta, period, lr)
        if impl != "loop":
            raise ValueError(f"impl must be 'solve' or 'loop', got {impl!r}")
        outputs = []
        pending = None  # (prediction, activation) of the previous chunk's last token
        for start in range(0, length, period):
            stop = min(start + period, length)
            a = hidden[:, start:stop]
            prediction = x[:, start:stop] + base[:, start:stop] + a @ delta.mT
            outputs.append(prediction)
            sources_pred, sources_act = prediction[:, :-1], a[:, :-1]
            if pending is not None:
                sources_pred = torch.cat([pending[0], sources_pred], dim=1)
                sources_act = torch.cat([pending[1], sources_act], dim=1)
            targets = x[:, start + (pending is None) : stop]
            if targets.shape[1] > 0:
                errors = sources_pred - targets  # (B, pairs, d)
                delta = delta - (lr / period) * 2 * errors.mT @ sources_act
            pending = (prediction[:, -1:], a[:, -1:])
        return torch.cat(outputs, dim=1), delta


def _in_context_solve(
    x: torch.Tensor, fixed: torch.Tensor, hidden: torch.Tensor, delta: torch.Tensor, period: int, lr: float,
    block_tokens: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk loop of ``CMSLevel.forward_in_context`` as one triangular solve per block of chunks.

    Write r_s = Δ(s) a_s for the fast part of token s's prediction p_s = fixed_s + r_s, where Δ(s)
    is the delta at the start of s's chunk (starting at S(s)). Δ(s) holds every pair (j, j+1) whose
    target lies in an earlier chunk, j ≤ S(s) − 2, each with the error e_j = p_j − x_{j+1} of the
    prediction made then:

        r_s = Δ₀ a_s − c Σ_{j ≤ S(s)−2} (a_jᵀ a_s) (u_j + r_j),   u_j = fixed_j − x_{j+1},   c = 2·lr/period.

    That is (I + c L) r = Δ₀ a − c L u with L_sj = a_jᵀ a_s for j ≤ S(s) − 2: strictly lower
    triangular, so one unit-triangular solve gives every r of a block, where the loop does the same
    forward substitution chunk by chunk (hundreds of small steps at period 1). Blocks of
    ``block_tokens`` (a whole number of chunks) bound the (T × T) Gram matrix's memory; the pair
    that crosses into a block carries its error from the previous one.
    """
    length = x.shape[1]
    c = 2 * lr / period
    block = period * max(1, block_tokens // period)
    outputs = []
    carried = None  # (prediction, activation) of the last token of the previous block
    for start in range(0, length, block):
        stop = min(start + block, length)
        a, targets = hidden[:, start:stop], x[:, start:stop]
        n = stop - start
        chunk_start = torch.div(torch.arange(n, device=x.device), period, rounding_mode="floor") * period
        rhs = a @ delta.mT  # Δ₀ a_s
        if carried is not None:  # the pair (start − 1, start): seen by the block's later chunks
            error = carried[0] - targets[:, 0]  # (B, d)
            seen = (chunk_start >= 1).to(x.dtype)[None, :, None]
            rhs = rhs - c * seen * (a @ carried[1].unsqueeze(-1)) * error.unsqueeze(1)
        included = torch.arange(n, device=x.device)[None, :] <= chunk_start[:, None] - 2  # (s, j)
        if included.any():
            gram = (a @ a.mT) * included.to(x.dtype)  # L, zero on and above the diagonal
            u = torch.cat([fixed[:, start : stop - 1] - targets[:, 1:], torch.zeros_like(targets[:, :1])], dim=1)
            # (I + cL)⁻¹ (rhs − cL u) = (I + cL)⁻¹ (rhs + u) − u: one solve, no (n × n)·(n × d) product
            # (which costs as much as the solve, forward and backward).
            rhs = torch.linalg.solve_triangular(c * gram, rhs + u, upper=False, unitriangular=True) - u
        prediction = fixed[:, start:stop] + rhs
        outputs.append(prediction)
        # Δ at the next block: every pair whose target lies in this block
        update = (prediction[:, :-1] - targets[:, 1:]).mT @ a[:, :-1]
        if carried is not None:
            update = update + error.unsqueeze(-1) * carried[1].unsqueeze(1)
        delta = delta - c * update
        carried = (prediction[:, -1], a[:, -1])
    return torch.cat(outputs, dim=1), delta


def _swiglu_hidden(mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    return F.silu(mlp.gate(x)) * mlp.up(x)


class ContinuumMemory(nn.Module):
    """Levels applied in order, fastest first.

    Args:
        periods: training-step period of each level (``NestedScheduler``).
        context_periods: if given, in-context fast weights: level ℓ updates every
            ``context_periods[ℓ]`` tokens (one entry per level).
        context_lr: inner learning rate of the in-context updates.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        periods: tuple[int, ...],
        eps: float = 1e-6,
        context_periods: tuple[int, ...] | None = None,
        context_lr: float = 0.1,
    ) -> None:
        super().__init__()
        if list(periods) != sorted(periods):
            raise ValueError(f"CMS periods must be non-decreasing (fastest level first), got {periods}")
        if context_periods is not None and len(context_periods) != len(periods):
            raise ValueError(
                f"cms_context_periods {tuple(context_periods)} must have one entry per CMS level "
                f"({len(periods)} levels from cms_periods {tuple(periods)}); give both the same length"
            )
        self.periods = tuple(periods)
        self.context_periods = tuple(context_periods) if context_periods is not None else None
        self.context_lr = context_lr
        self.levels = nn.ModuleList(CMSLevel(dim, hidden, eps) for _ in periods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context_periods is None:
            for level in self.levels:
                x = level(x)
            return x
        for level, period in zip(self.levels, self.context_periods):
            x, _ = level.forward_in_context(x, period, self.context_lr)
        return x
