"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017): importance from the path integral of the loss."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer

from nl_lightning.callbacks.continual import (
    ContinualStrategy,
    check_strength,
    quadratic_penalty,
    snapshot,
    trainable_parameters,
)


class SynapticIntelligence(ContinualStrategy):
    r"""Protect parameters in proportion to how much they lowered the loss along their path.

    While training task i every optimizer step t adds to a running path integral

        ω_k += −g_{t,k} · (θ_{t+1,k} − θ_{t,k}),

    g being the gradient the optimizer used (read in ``on_before_optimizer_step``, i.e. after any
    ``NestedScheduler`` placed *before* this callback has summed or skipped it) and θ_{t+1} − θ_t
    the change the step actually made. After task i (at the start of task i+1) it converts ω into
    an importance and re-anchors:

        Ω_k += max(ω_k, 0) / (Δ_k² + ξ),   Δ = θ_i − θ_{i−1} (the task's total change),
        θ* ← θ_i,  ω ← 0.

    The clamp at 0 is ours: a negative path integral means the parameter moved *against* its
    gradient on balance (momentum overshoot, weight decay), which says nothing about importance,
    and a negative Ω would turn the penalty into a repulsion. The penalty is

        λ Σ_k Ω_k (θ_k − θ*_k)²        (no ½, as in the paper).

    Args:
        strength: λ, the paper's c.
        damping: ξ > 0, keeps Ω finite for parameters that ended the task where they started.

    ω, Ω, θ* and the start-of-task weights are saved in the checkpoint.
    """

    def __init__(self, strength: float = 1.0, damping: float = 0.1) -> None:
        self.strength = check_strength("SI strength", strength)
        if not damping > 0:
            raise ValueError(f"SI damping ξ must be > 0 (it divides by Δ² + ξ), got {damping!r}")
        self.damping = float(damping)
        self.path_integral: dict[str, Tensor] = {}  # ω of the task in progress
        self.task_start: dict[str, Tensor] = {}  # θ at the start of the task in progress
        self.importance: dict[str, Tensor] = {}  # Ω
        self.anchor: dict[str, Tensor] = {}  # θ*
        self._before: dict[str, tuple[Tensor, Tensor]] = {}  # per step: (θ_t, g_t)

    def on_task_start(self, trainer: Trainer | None, pl_module: LightningModule, task: int) -> None:
        params = trainable_parameters(pl_module)
        if self.task_start:
            self.consolidate(params)
        self.task_start = snapshot(params)
        self.path_integral = {name: torch.zeros_like(p) for name, p in self.task_start.items()}

    def on_before_optimizer_step(
        self, trainer: Trainer | None, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.path_integral:
            return  # the module did not announce a task (not a ContinualClassifier)
        self._before = {
            name: (p.detach().clone(), p.grad.detach().clone())
            for name, p in trainable_parameters(pl_module).items() if p.grad is not None
        }

    def on_train_batch_end(self, trainer: Trainer | None, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._before:
            return  # no optimizer step in this batch (gradient accumulation)
        params = trainable_parameters(pl_module)
        for name, (before, grad) in self._before.items():
            if self.path_integral[name].device != before.device:  # state restored from a checkpoint on CPU
                self.path_integral[name] = self.path_integral[name].to(before.device)
            self.path_integral[name] -= grad * (params[name].detach() - before)
        self._before = {}

    def consolidate(self, params: dict[str, Tensor]) -> None:
        """Fold the finished task's path integral into Ω and anchor at the current weights."""
        for name, p in params.items():
            change = p.detach() - self.task_start[name].to(p.device)
            omega = self.path_integral[name].to(p.device).clamp_min(0) / (change.square() + self.damping)
            self.importance[name] = self.importance[name].to(p.device) + omega if name in self.importance else omega
        self.anchor = snapshot(params)

    def penalty(self, pl_module: LightningModule) -> Tensor | None:
        if not self.importance or self.strength == 0:
            return None
        return self.strength * quadratic_penalty(trainable_parameters(pl_module), self.importance, self.anchor)

    def state_dict(self) -> dict[str, Any]:
        return {"path_integral": self.path_integral, "task_start": self.task_start,
                "importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("path_integral", "task_start", "importance", "anchor"):
            setattr(self, key, dict(state_dict[key]))
