"""Continual-learning metrics over the accuracy matrix, as torchmetrics ``Metric``s.

``R`` is a T×T tensor: ``R[i, j]`` = test accuracy on task j right after training task i, NaN
where not measured yet. "Now" is the last row whose diagonal is measured, ``k``; the metrics
describe the model after training tasks 0…k (so they work on a partly filled matrix during
training). Entries above the diagonal (forward transfer) are ignored.

==================  =====================================================  ==========================
metric              definition (k = last trained task)                     reference
==================  =====================================================  ==========================
average accuracy    ACC = 1/(k+1) Σ_{j≤k} R[k, j]                          Lopez-Paz & Ranzato 2017
backward transfer   BWT = 1/k Σ_{j<k} (R[k, j] − R[j, j])                  Lopez-Paz & Ranzato 2017
forgetting          F = 1/k Σ_{j<k} (max_{l∈[j, k−1]} R[l, j] − R[k, j])   Chaudhry et al. 2018
retention           RET = Σ_{j<k} R[k, j] / Σ_{j<k} R[j, j]                this project (below)
learning accuracy   LA = 1/(k+1) Σ_{j≤k} R[j, j]                           Riemer et al. 2019
==================  =====================================================  ==========================

Retention is the fraction of the accuracy the earlier tasks had right after they were learned
that is still there at the end (1 = nothing forgotten, > 1 = later tasks helped). A ratio of sums
rather than a mean of ratios, so a task learned to near-zero accuracy cannot blow it up. Every
plot and table in this project uses this definition. With one task trained (k = 0) there is
nothing to forget: BWT = F = 0 and RET = 1 by convention.

Each ``update(R)`` adds one run's value; ``compute()`` is the mean over the runs seen (e.g. over
seeds), summed across DDP ranks.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def _last_trained_task(R: torch.Tensor) -> int:
    """Validate ``R`` and return k, the last task whose row (up to the diagonal) is measured."""
    if not isinstance(R, torch.Tensor) or R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        shape = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise ValueError(f"accuracy matrix must be a square T×T tensor with T ≥ 1, got {shape}")
    measured = ~torch.isnan(torch.diagonal(R))
    if not measured[0]:
        raise ValueError("accuracy matrix has no measurement yet (R[0, 0] is NaN); update after the first task")
    k = int(measured.nonzero().max())
    lower = torch.tril(torch.ones_like(R, dtype=torch.bool))[: k + 1]
    if torch.isnan(R[: k + 1][lower]).any():
        raise ValueError(
            f"accuracy matrix rows 0…{k} must be measured on every task seen so far (R[i, j], j ≤ i); "
            f"found NaN in\n{R[: k + 1]}"
        )
    return k


def _values(R: torch.Tensor, strict: bool = True) -> dict[str, float]:
    R = R.detach().to(torch.float64).cpu()
    k = _last_trained_task(R)
    final, diag = R[k, : k + 1], torch.diagonal(R)[: k + 1]
    values = {
        "average_accuracy": final.mean().item(),
        "learning_accuracy": diag.mean().item(),
        "backward_transfer": 0.0,
        "forgetting": 0.0,
        "retention": 1.0,
        "tasks_seen": float(k + 1),
    }
    if k > 0:
        old = torch.arange(k)
        best_before = torch.stack([R[j:k, j].max() for j in old.tolist()])
        values["backward_transfer"] = (final[:k] - diag[:k]).mean().item()
        values["forgetting"] = (best_before - final[:k]).mean().item()
        learned = diag[:k].sum().item()
        if learned <= 0 and not strict:
            values["retention"] = math.nan
        elif learned <= 0:
            raise ValueError(
                f"retention is undefined: tasks 0…{k - 1} had zero accuracy right after training "
                "(nothing was learned); check the learning rate / epochs per task"
            )
        else:
            values["retention"] = final[:k].sum().item() / learned
    return values


def continual_summary(R: torch.Tensor, strict: bool = True) -> dict[str, float]:
    """All metrics of one accuracy matrix (keys: ``average_accuracy``, ``backward_transfer``,
    ``forgetting``, ``retention``, ``learning_accuracy``, ``tasks_seen``). Retention is undefined
    when the earlier tasks had zero accuracy right after training: ``strict`` raises then, otherwise
    it is NaN (the other metrics stay defined)."""
    return _values(R, strict)


class _AccuracyMatrixMetric(Metric):
    """Mean over updates of one scalar computed from an accuracy matrix."""

    key: str = ""
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("runs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, accuracy_matrix: torch.Tensor) -> None:
        self.total += _values(accuracy_matrix)[self.key]
        self.runs += 1

    def compute(self) -> torch.Tensor:
        if self.runs == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before update(accuracy_matrix)")
        return (self.total / self.runs).float()


class AverageAccuracy(_AccuracyMatrixMetric):
    """ACC = mean accuracy over the tasks seen so far, measured now (Lopez-Paz & Ranzato 2017)."""

    key = "average_accuracy"
    higher_is_better = True


class BackwardTransfer(_AccuracyMatrixMetric):
    """BWT = mean change of an earlier task's accuracy since it was learned (< 0: forgetting)."""

    key = "backward_transfer"
    higher_is_better = True


class Forgetting(_AccuracyMatrixMetric):
    """F = mean drop from an earlier task's best accuracy to its accuracy now (Chaudhry et al. 2018)."""

    key = "forgetting"
    higher_is_better = False


class Retention(_AccuracyMatrixMetric):
    """RET = Σ_{j<k} R[k, j] / Σ_{j<k} R[j, j]: share of earlier tasks' just-learned accuracy kept."""

    key = "retention"
    higher_is_better = True


class LearningAccuracy(_AccuracyMatrixMetric):
    """LA = mean accuracy on each task right after training it: plasticity (Riemer et al. 2019)."""

    key = "learning_accuracy"
    higher_is_better = True
