"""Continuum Memory System: a chain of MLP levels, each updated on its own timescale (SPEC §2).

``y = MLP^{(f_K)}(… MLP^{(f_1)}(o))``. Level ℓ's parameters carry a training-step ``period``
C(ℓ): the ``NestedScheduler`` callback (or a level-aware optimizer) changes them only every C(ℓ)
optimizer steps, with the sum of the gradients since the last change. The chain itself is an
ordinary module; the periods travel as parameter-group metadata (``param_groups``).
"""

from __future__ import annotations

from torch import nn

from nl_lightning.models.layers import RMSNorm, SwiGLU


class CMSLevel(nn.Module):
    """One level: pre-norm residual SwiGLU MLP."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class ContinuumMemory(nn.Module):
    """Levels applied in order, fastest first; ``periods[ℓ]`` is level ℓ's update period."""

    def __init__(self, dim: int, hidden: int, periods: tuple[int, ...], eps: float = 1e-6) -> None:
        super().__init__()
        if list(periods) != sorted(periods):
            raise ValueError(f"CMS periods must be non-decreasing (fastest level first), got {periods}")
        self.periods = tuple(periods)
        self.levels = nn.ModuleList(CMSLevel(dim, hidden, eps) for _ in periods)

    def forward(self, x):
        for level in self.levels:
            x = level(x)
        return x
