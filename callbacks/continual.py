"""The protocol between ``ContinualClassifier`` and continual-learning strategies (issue 7).

A strategy is a Lightning ``Callback`` that may also implement any of three methods the
``nl_lightning.modules.ContinualClassifier`` calls itself (Lightning has no hooks for them):

- ``on_task_start(trainer, pl_module, task)``: from the module's ``on_train_epoch_start`` at the
  first epoch of every task. Strategies consolidate the *previous* task here rather than at the
  end of a task, so that the checkpoint written at a task's end (during its last validation)
  and a run resumed from it see exactly the same state as an uninterrupted run.
- ``transform_batch(batch, pl_module) -> batch``: in ``training_step``, on ``(x, y, task_ids)``
  before the forward pass (replay appends remembered examples here).
- ``penalty(pl_module) -> Tensor | None``: in ``training_step``; added to the loss and logged as
  ``train/penalty/<name>``.

Subclassing :class:`ContinualStrategy` is optional (the module looks the methods up by name);
the base class only documents the defaults. The helpers below are shared by EWC and SI.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor


class ContinualStrategy(Callback):
    """Base class of the continual-learning strategies (no-op defaults for the three methods)."""

    def on_task_start(self, trainer: Trainer, pl_module: LightningModule, task: int) -> None:
        """Called at the first training epoch of ``task`` (0, 1, …)."""

    def transform_batch(self, batch: tuple[Tensor, Tensor, Tensor], pl_module: LightningModule):
        """``(x, y, task_ids)`` → the batch to train on."""
        return batch

    def penalty(self, pl_module: LightningModule) -> Tensor | None:
        """A regularisation term added to the training loss, or None."""
        return None


def trainable_parameters(pl_module: LightningModule) -> dict[str, Tensor]:
    """``{name: parameter}`` of everything the optimizer trains (what EWC/SI protect)."""
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}


def snapshot(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def quadratic_penalty(params: dict[str, Tensor], importance: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """``Σ_k importance_k (θ_k − anchor_k)²`` over the named parameters (moving the state to θ's device once)."""
    total = None
    for name, p in params.items():
        if name not in importance:
            continue
        if importance[name].device != p.device:
            importance[name], anchor[name] = importance[name].to(p.device), anchor[name].to(p.device)
        term = (importance[name] * (p - anchor[name]).square()).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError(
            f"none of the protected parameters {sorted(importance)[:3]}… exists in "
            f"the module any more; restore the same network, or start without this strategy's checkpoint state"
        )
    return total


def check_strength(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0 (the penalty strength λ), got {value!r}")
    return float(value)
