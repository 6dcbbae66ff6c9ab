"""Per-level update periods for any LightningModule (SPEC §5)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from nl_lightning.optim.level_aware import LevelSchedule, check_period


class NestedScheduler(Callback):
    r"""Update each level of parameters only every ``period`` optimizer steps, with its summed gradient.

    Step convention (the same everywhere in nl_lightning): optimizer steps are counted from 1; a
    level of period P updates at steps P, 2P, 3P, … with the sum of the P gradients computed
    since its previous update. Steps are *optimizer* steps, so ``accumulate_grad_batches=k`` needs
    k batches per step.

    Args:
        levels: ``{glob: period}``. Each glob is a level, matched with ``fnmatch`` against the names
            of ``pl_module.named_parameters()`` (e.g. ``"network.blocks.*.cms.levels.2.*"``).
            Parameters no glob matches train every step. ``None`` reads ``period`` from the
            optimizer's param groups instead (the level is the group's ``name``, else
            ``level<level>``, else ``group<index>``), e.g. HOPE's CMS groups.
        bridges: ``(level_a, level_b)`` pairs for a ``NestedOptimizer`` to execute; the callback
            only checks that they name known levels.
        log_every_n_steps: log per-level scalars every this many optimizer steps.

    How it schedules. In ``on_before_optimizer_step`` (gradients are final there, after DDP's
    all-reduce) every level of period > 1 adds its gradients to a sum
    (``nl_lightning.optim.LevelSchedule``). A level that is not due gets ``p.grad = None``, so any
    torch optimizer skips it: its parameters *and* optimizer state (Adam's ``step`` and moments,
    momentum, weight decay) stay as they are. A due level gets the sum as ``p.grad``. Lightning
    clips gradients *after* this hook, so ``gradient_clip_val`` sees the summed gradients of the
    due levels (and none of the skipped ones).

    When the optimizer schedules levels itself (``LevelAwareOptimizer``, or anything with
    ``is_level_aware`` or ``level_stats``, such as ``NestedOptimizer``) the callback only checks
    and logs. That is required under DeepSpeed, where the engine owns the step; then every param
    group must hold one level and carry its ``period``.

    Logged to every logger of the Trainer (TensorBoard by default), on global rank 0:

    - ``nested/<level>/updates``: updates so far (``step // period``);
    - ``nested/<level>/update_norm``: ``‖θ_after − θ_before‖`` over the level's parameters at its
      latest update, measured around the optimizer step (parameters copied in
      ``on_before_optimizer_step``, compared in ``on_train_batch_end``; only at the last update
      before each logging step, so the copies are rare);
    - ``nested/<level>/surprise`` (levels of period > 1, from their second update):
      ``‖Σ_k − Σ_{k−1}‖ / (‖Σ_{k−1}‖ + ε)``, Σ_k being the level's gradient summed over its k-th
      cycle: 0 when the level keeps seeing the same gradient, ≈1.4 for unrelated ones;
    - ``nested/<key>`` for every entry of the optimizer's ``level_stats()`` (bridge gates and
      transfer norms of a ``NestedOptimizer``, surprise of a ``LevelAwareOptimizer``).

    The step counter and the gradient sums are saved in the checkpoint, so a run stopped
    mid-cycle and resumed is bit-identical to an uninterrupted one.

    Example::

        trainer = Trainer(callbacks=[NestedScheduler({"*.cms.levels.1.*": 4, "*.cms.levels.2.*": 16})])

    Raises:
        ValueError: at ``setup`` for a period that is not a positive integer, a glob matching no
            parameter, a parameter claimed by two levels, a level with no trainable parameter or a
            bridge naming an unknown level; at ``on_fit_start`` (the first hook that sees the
            optimizer) for configurations the optimizer cannot honour.
    """

    def __init__(
        self,
        levels: dict[str, int] | None = None,
        bridges: Sequence[tuple[str, str]] | None = None,
        log_every_n_steps: int = 50,
    ) -> None:
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps!r}")
        self.levels = dict(levels) if levels is not None else None
        self.bridges = [tuple(bridge) for bridge in bridges or ()]
        self.log_every_n_steps = log_every_n_steps
        self._step = 0  # optimizer steps taken
        self._periods: dict[str, int] = {}
        self._params: dict[str, dict[str, Tensor]] = {}  # level → {parameter name: parameter}
        self._schedule: LevelSchedule | None = None  # None while the optimizer schedules itself
        self._level_aware: Any = None  # the optimizer that schedules itself, if any
        self._logging = False
        self._snapshots: dict[str, list[Tensor]] = {}
        self._update_norms: dict[str, Tensor] = {}
        self._logged_step = 0
        self._pending_state: dict[str, Any] | None = None

    # -- hooks, in the order they fire -------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.levels is None:
            return
        named = dict(pl_module.named_parameters())
        claimed: dict[str, str] = {}
        self._params, self._periods = {}, {}
        for glob, period in self.levels.items():
            check_period(glob, period)
            matches = [name for name in named if fnmatch.fnmatchcase(name, glob)]
            if not matches:
                examples = ", ".join(repr(name) for name in list(named)[:4])
                raise ValueError(
                    f"NestedScheduler: level {glob!r} matches no parameter of {type(pl_module).__name__}; "
                    f"fix the glob (it is matched with fnmatch against named_parameters() names such as {examples})"
                )
            for name in matches:
                if name in claimed:
                    raise ValueError(
                        f"NestedScheduler: parameter {name!r} is matched by levels {claimed[name]!r} and {glob!r}; "
                        "make the globs disjoint so that every parameter belongs to one level"
                    )
                claimed[name] = glob
            trainable = {name: named[name] for name in matches if named[name].requires_grad}
            if not trainable:
                raise ValueError(
                    f"NestedScheduler: level {glob!r} has no trainable parameters (it matches only "
                    f"requires_grad=False ones: {matches[:4]}); drop the level or unfreeze them"
                )
            self._params[glob], self._periods[glob] = trainable, period
        self._check_bridges(self._periods)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"NestedScheduler schedules exactly one optimizer, but the LightningModule configured "
                f"{len(trainer.optimizers)}; return a single optimizer from configure_optimizers"
            )
        optimizer = trainer.optimizers[0]
        self._level_aware = _level_aware(optimizer)
        groups = _grouped_params(optimizer)
        if self.levels is None:
            self._levels_from_groups(pl_module, groups)
        deepspeed = "DeepSpeed" in type(trainer.strategy).__name__
        if deepspeed or getattr(self._level_aware, "is_level_aware", False):
            self._check_one_level_per_group(groups, "DeepSpeed owns the optimizer step" if deepspeed else
                                            f"{type(self._level_aware).__name__} schedules the levels itself")
        if self._level_aware is not None and not getattr(self._level_aware, "is_level_aware", False):
            slow = {level: p for level, p in self._periods.items() if p > 1}
            if slow:
                raise ValueError(
                    f"NestedScheduler: {type(self._level_aware).__name__} runs its own levels and does not skip "
                    f"parameters by period, so levels {slow} would be ignored; drop them from NestedScheduler "
                    "(keep it for logging) or use a plain optimizer / LevelAwareOptimizer for per-parameter periods"
                )
        if deepspeed and self._level_aware is None:
            raise ValueError(
                f"NestedScheduler: under DeepSpeed the engine owns the optimizer step, so the optimizer must "
                f"schedule levels itself, but {type(_innermost(optimizer)).__name__} does not; use "
                "nl_lightning.optim.LevelAwareAdamW (or make_level_aware(YourOptimizer)) with 'period' on each "
                "param group"
            )
        if self._level_aware is None:
            if self.levels is not None:
                self._warn_on_group_periods(groups)
            if self._schedule is None or self._schedule.periods != self._periods:
                self._schedule = LevelSchedule(self._periods)
        else:
            self._schedule = None
        self._logging = trainer.is_global_zero and bool(trainer.loggers)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning restores callbacks before or after on_fit_start depending on the strategy;
        # here both the levels and the restored state are known.
        if self._pending_state is None:
            return
        state, self._pending_state = self._pending_state, None
        if dict(state["periods"]) != self._periods:
            raise ValueError(
                f"NestedScheduler: the checkpoint was written with levels {dict(state['periods'])} but this run "
                f"has {self._periods}; resume with the same levels, or start a new run without ckpt_path"
            )
        if (state["schedule"] is None) != (self._schedule is None):
            raise ValueError(
                "NestedScheduler: the checkpoint was written with the "
                f"{'callback' if state['schedule'] is not None else 'optimizer'} scheduling the levels, this run "
                "has the other one; resume with the same optimizer"
            )
        self._step = state["step"]
        self._logged_step = self._step
        if self._schedule is not None:
            self._schedule.load_state_dict(state["schedule"], self._params)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self._step += 1
        if self._schedule is not None:
            self._schedule.step(self._params)
        if self._logging:
            for level in self._levels_to_measure():
                self._snapshots[level] = [p.detach().clone() for p in self._params[level].values()]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for level, before in self._snapshots.items():
            after = [p.detach() for p in self._params[level].values()]
            change = torch._foreach_norm(torch._foreach_sub(after, before))
            self._update_norms[level] = torch.linalg.vector_norm(torch.stack(change))
        self._snapshots = {}
        if self._logging and self._step % self.log_every_n_steps == 0 and self._step != self._logged_step:
            self._log(trainer)

    def update_counts(self) -> dict[str, int]:
        """How often each level has been updated so far (``nested/<level>/updates`` in TensorBoard)."""
        return {level: self._step // period for level, period in self._periods.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "periods": dict(self._periods),
            "schedule": self._schedule.state_dict() if self._schedule is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)  # applied in on_train_start

    # -- helpers -------------------------------------------------------------------------------------

    def _levels_from_groups(self, pl_module: LightningModule, groups: list[tuple[dict, list[Tensor]]]) -> None:
        names = {id(p): name for name, p in pl_module.named_parameters()}
        self._params, self._periods = {}, {}
        for index, (group, params) in enumerate(groups):
            if "period" not in group:
                continue
            level = group.get("name") or (f"level{group['level']}" if "level" in group else f"group{index}")
            check_period(level, group["period"])
            if self._periods.setdefault(level, group["period"]) != group["period"]:
                raise ValueError(
                    f"NestedScheduler: param groups of level {level!r} have periods {self._periods[level]} and "
                    f"{group['period']}; give groups of one level the same period, or different names"
                )
            level_params = self._params.setdefault(level, {})
            level_params.update({names[id(p)]: p for p in params if id(p) in names and p.requires_grad})
        if not self._periods and self._level_aware is None:
            raise ValueError(
                "NestedScheduler(levels=None) reads 'period' from the optimizer's param groups, but none has "
                "one; pass levels={glob: period}, or add 'period' to the groups returned by configure_optimizers"
            )
        for level, params in self._params.items():
            if not params:
                raise ValueError(
                    f"NestedScheduler: level {level!r} (from the optimizer's param groups) has no trainable "
                    "parameter of the LightningModule; drop its 'period' or give the group parameters"
                )
        self._check_bridges({**self._periods, **dict.fromkeys(getattr(self._level_aware, "level_names", ()), 1)})

    def _check_bridges(self, known: dict[str, int]) -> None:
        for bridge in self.bridges:
            if len(bridge) != 2 or bridge[0] == bridge[1]:
                raise ValueError(
                    f"NestedScheduler: bridge {bridge!r} must be a pair of two different levels, e.g. "
                    f"({', '.join(map(repr, list(known)[:2]))})"
                )
            for level in bridge:
                if level not in known:
                    raise ValueError(
                        f"NestedScheduler: bridge {bridge[0]!r} -> {bridge[1]!r} names unknown level {level!r}; "
                        f"bridges must connect the levels {sorted(known)}"
                    )

    def _check_one_level_per_group(self, groups: list[tuple[dict, list[Tensor]]], why: str) -> None:
        """The optimizer skips whole param groups, so each group must hold one period and carry it."""
        period_of = {id(p): self._periods[level] for level, ps in self._params.items() for p in ps.values()}
        level_of = {id(p): level for level, ps in self._params.items() for p in ps.values()}
        for index, (group, params) in enumerate(groups):
            periods = {period_of.get(id(p), 1) for p in params}
            if len(periods) > 1:
                found = sorted({f"{level_of.get(id(p), '<unmatched>')} (period {period_of.get(id(p), 1)})"
                                for p in params})
                raise ValueError(
                    f"NestedScheduler: {why} and can only skip whole param groups, but param group {index} mixes "
                    f"parameters of different periods: {', '.join(found)}; give each level its own param group "
                    "with 'period' set"
                )
            want = periods.pop() if periods else 1
            if group.get("period", 1) != want:
                raise ValueError(
                    f"NestedScheduler: {why}, but param group {index} has period {group.get('period', 1)} while its "
                    f"parameters belong to a level of period {want}; set 'period': {want} on that group, or pass "
                    "levels=None to take the periods from the param groups"
                )

    def _warn_on_group_periods(self, groups: list[tuple[dict, list[Tensor]]]) -> None:
        period_of = {id(p): self._periods[level] for level, ps in self._params.items() for p in ps.values()}
        for index, (group, params) in enumerate(groups):
            if "period" in group and any(period_of.get(id(p), 1) != group["period"] for p in params):
                rank_zero_warn(
                    f"NestedScheduler: param group {index} carries period {group['period']}, which differs from the "
                    "callback's levels for some of its parameters; the callback's levels are used. Pass levels=None "
                    "to use the groups' periods instead."
                )
                return

    def _levels_to_measure(self) -> list[str]:
        """Levels updating now for the last time before the next logging step."""
        n = self.log_every_n_steps
        next_log = -(-self._step // n) * n
        return [
            level for level, period in self._periods.items()
            if self._step % period == 0 and self._step + period > next_log
        ]

    def _log(self, trainer: Trainer) -> None:
        metrics: dict[str, float] = {}
        for level, period in self._periods.items():
            metrics[f"nested/{level}/updates"] = float(self._step // period)
            if level in self._update_norms:
                metrics[f"nested/{level}/update_norm"] = self._update_norms[level].item()
            surprise = self._schedule.surprise([level]) if self._schedule is not None else None
            if surprise is not None:
                metrics[f"nested/{level}/surprise"] = surprise.item()
        if hasattr(self._level_aware, "level_stats"):
            metrics.update({f"nested/{key}": float(value) for key, value in self._level_aware.level_stats().items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._logged_step = self._step


def _innermost(optimizer: Any) -> Any:
    """The optimizer under wrappers such as DeepSpeed's ZeRO optimizer (``.optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _level_aware(optimizer: Any) -> Any:
    """The first optimizer, from the outermost wrapper in, that schedules levels itself (or None)."""
    while optimizer is not None:
        if getattr(optimizer, "is_level_aware", False) or hasattr(optimizer, "level_stats"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if isinstance(inner, Optimizer) else None
    return None


def _grouped_params(optimizer: Any) -> list[tuple[dict, list[Tensor]]]:
    """(param group, its model parameters), seeing through DeepSpeed ZeRO's flat partitions."""
    groups = optimizer.param_groups
    if hasattr(optimizer, "bit16_groups"):  # ZeRO-1/2: one flat fp32 partition per group
        return list(zip(groups, optimizer.bit16_groups))
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "sub_group_to_group_id"):  # ZeRO-3 sub-groups
        params: list[list[Tensor]] = [[] for _ in groups]
        for sub_group, sub_params in enumerate(optimizer.fp16_groups):
            params[optimizer.sub_group_to_group_id[sub_group]].extend(sub_params)
        return list(zip(groups, params))
    return [(group, list(group["params"])) for group in groups]
