"""What one level of ``NestedOptimizer`` does with its summed gradient: the ``InnerRule`` interface
and its linear case ``MomentumSGD`` (the default, DMGD's ``DeepMomentum``, is in ``dmgd.py``).

In a module of their own so that ``dmgd.py`` and ``nested.py`` both build on them without
importing each other.
"""

from __future__ import annotations

import torch
from torch import Tensor


class InnerRule:
    """How one level turns the gradient summed since its previous tick into a weight update.

    Every level, the live one included, runs an ``InnerRule`` on its own per-parameter state.
    The default is DMGD's ``DeepMomentum`` (SPEC §4, ``nl_lightning.optim.dmgd``); ``MomentumSGD``
    is the linear-memory special case, kept selectable (``inner=MomentumSGD(0.9)``).
    """

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        """Fresh per-parameter state (tensors only: it is checkpointed and may be sharded)."""
        raise NotImplementedError

    def prediction(self, state: dict[str, Tensor], ticks: int) -> Tensor | None:
        """The rule's running estimate of the next summed gradient (its "momentum" m), or None
        before it has seen one. The gradient surprise ``‖ḡ − m‖ / (‖m‖ + ε)`` is measured against it."""
        raise NotImplementedError

    def update(self, state: dict[str, Tensor], grad_sum: Tensor, lr: float) -> Tensor:
        """Advance the state with the summed gradient and return the update to add to the weights."""
        raise NotImplementedError


class MomentumSGD(InnerRule):
    """Heavy-ball momentum as in ``torch.optim.SGD``: ``b ← μ b + ḡ``, update ``−lr · b``.

    Its prediction of ḡ is the bias-corrected running mean ``b (1 − μ) / (1 − μⁿ)`` after n ticks,
    which equals ḡ exactly when the summed gradient is constant (zero surprise).
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def prediction(self, state: dict[str, Tensor], ticks: int) -> Tensor | None:
        if ticks == 0:
            return None
        return state["momentum_buffer"] * ((1 - self.momentum) / (1 - self.momentum**ticks))

    def update(self, state: dict[str, Tensor], grad_sum: Tensor, lr: float) -> Tensor:
        buffer = state["momentum_buffer"].mul_(self.momentum).add_(grad_sum)
        return buffer * -lr
