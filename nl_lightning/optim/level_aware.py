"""Level-aware stepping: a level of period P updates every P optimizer steps with its summed gradient.

Step convention (SPEC §5, the same everywhere): optimizer steps are counted from 1; a level of
period P updates at steps P, 2P, 3P, … with the sum of the P gradients computed since its
previous update (each at the weights current when it was computed). A level that is not due is
*skipped*, not zero-stepped: its ``.grad`` is ``None`` when the inner optimizer runs, so every
torch optimizer leaves both the parameters and their state (Adam's ``step`` and moments,
momentum buffers, weight decay) untouched. A period-``P`` level's optimizer state therefore
advances once per P steps.

Two users share ``LevelSchedule``:

- ``nl_lightning.callbacks.NestedScheduler`` drives it from Lightning's ``on_before_optimizer_step``
  (plain and DDP training, any torch optimizer);
- ``LevelAwareOptimizer`` puts it inside the optimizer, which is what runs when DeepSpeed owns the
  step: param groups keep extra keys such as ``period`` under ZeRO, and ZeRO-1/2 call the base
  optimizer once per group with ``param_groups`` narrowed to that group, so each group counts its
  own steps.

Plain PyTorch: no Lightning import here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping

import torch
from torch import Tensor

EPS = 1e-12


def evaluate_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The loss ``closure`` returns (None without one), evaluated with gradients on: optimizers'
    ``step`` runs under ``torch.no_grad``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def check_period(level: str, period) -> None:
    """Raise if ``period`` is not a positive integer number of optimizer steps."""
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(
            f"level {level!r} has period {period!r}; a period must be a positive integer number of "
            "optimizer steps (1 = update every step)"
        )


class LevelSchedule:
    """Counts optimizer steps from 1, sums each level's gradients and says which levels are due.

    Args:
        periods: level name → period (a positive integer).

    ``step(params)`` is one optimizer step for the levels in ``params`` (level → {key: parameter}),
    called when the gradients are final and before the inner optimizer runs. For every level of
    period > 1 it adds each ``p.grad`` to a running sum (float32 for half/bfloat16 parameters,
    the parameter's dtype otherwise); then a due level gets the sum as ``p.grad`` and starts a new
    sum, and a level that is not due gets ``p.grad = None``. Period-1 levels are left alone.

    Keys name the parameters in ``state_dict`` (parameter names in the callback, ``"group.index"``
    in the optimizer). Each level counts its own steps, so a caller may step levels separately.

    Surprise of a level at its k-th update (k ≥ 2), over the level's parameters together:
    ``‖Σ_k − Σ_{k−1}‖ / (‖Σ_{k−1}‖ + ε)``, Σ_k being the gradient summed over its k-th cycle;
    reported for levels of period > 1, whose sums exist anyway.

    Non-finite gradients raise ``FloatingPointError`` before they are added to a sum.
    """

    def __init__(self, periods: Mapping[str, int]) -> None:
        for level, period in periods.items():
            check_period(level, period)
        self.periods = dict(periods)
        self.steps = dict.fromkeys(self.periods, 0)  # optimizer steps each level has taken part in
        self._sums: dict[Hashable, Tensor] = {}  # gradient summed since the key's last update
        self._previous: dict[Hashable, Tensor] = {}  # the sum released at the key's last update
        self._sum_sq: dict[str, Tensor] = {}  # ‖Σ‖² of each level's last released sum
        self._surprise_terms: dict[str, tuple[Tensor, Tensor]] = {}  # (‖Σ_k − Σ_{k−1}‖², ‖Σ_{k−1}‖²)

    def add_level(self, level: str, period: int) -> None:
        """A new level, starting at step 0."""
        check_period(level, period)
        if level in self.periods:
            raise ValueError(f"level {level!r} already exists")
        self.periods[level], self.steps[level] = period, 0

    def updates(self, level: str) -> int:
        """Updates the level has had so far."""
        return self.steps[level] // self.periods[level]

    def due(self, level: str) -> bool:
        """Whether the level updated at its latest step."""
        return self.steps[level] > 0 and self.steps[level] % self.periods[level] == 0

    def step(self, params: Mapping[str, Mapping[Hashable, Tensor]]) -> list[str]:
        """One optimizer step for the given levels; returns the names of the levels that update now."""
        accumulating = {level: ps for level, ps in params.items() if self.periods[level] > 1}
        self._check_finite(accumulating)
        due = []
        for level, level_params in params.items():
            self.steps[level] += 1
            if self.due(level):
                due.append(level)
            if level in accumulating:
                self._accumulate(level_params)
                if self.due(level):
                    self._release(level, level_params)
        return due

    def surprise(self, levels: Iterable[str]) -> Tensor | None:
        """Surprise of the levels' latest updates taken together (None before their second update)."""
        terms = [self._surprise_terms[level] for level in levels if level in self._surprise_terms]
        if not terms:
            return None
        diff_sq = torch.stack([d for d, _ in terms]).sum()
        previous_sq = torch.stack([p for _, p in terms]).sum()
        return diff_sq.sqrt() / (previous_sq.sqrt() + EPS)

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Step counters, partial sums and the statistics' history (tensors are copies)."""
        clone = lambda tensors: {k: v.detach().clone() for k, v in tensors.items()}  # noqa: E731
        return {
            "periods": dict(self.periods),
            "steps": dict(self.steps),
            "sums": clone(self._sums),
            "previous": clone(self._previous),
            "sum_sq": clone(self._sum_sq),
            "surprise_terms": {k: (d.clone(), p.clone()) for k, (d, p) in self._surprise_terms.items()},
        }

    def load_state_dict(self, state: Mapping, params: Mapping[str, Mapping[Hashable, Tensor]] | None) -> None:
        """Restore ``state``; ``params`` (as given to ``step``) checks the keys and places each sum on its
        parameter's device. ``None`` (parameters not reachable now) keeps the sums as saved; they move
        to their gradient's device at the next step."""
        if dict(state["periods"]) != self.periods:
            raise ValueError(
                f"the saved level schedule has periods {dict(state['periods'])} but this one has "
                f"{self.periods}; resume with the same levels and periods, or start a new run"
            )
        self.steps = dict(state["steps"])
        self._sum_sq = {k: t.clone() for k, t in state["sum_sq"].items()}
        self._surprise_terms = {k: (d.clone(), p.clone()) for k, (d, p) in state["surprise_terms"].items()}
        if params is None:
            self._sums = {k: t.clone() for k, t in state["sums"].items()}
            self._previous = {k: t.clone() for k, t in state["previous"].items()}
            return
        owners = {key: p for level_params in params.values() for key, p in level_params.items()}
        unknown = sorted(map(str, (set(state["sums"]) | set(state["previous"])) - set(owners)))
        if unknown:
            raise ValueError(
                f"the saved level schedule has gradient sums for {unknown[:5]} which are not parameters "
                "of any level now; resume with the same model and levels"
            )
        place = lambda key, t: t.to(device=owners[key].device, dtype=_sum_dtype(owners[key]), copy=True)  # noqa: E731
        self._sums = {k: place(k, t) for k, t in state["sums"].items()}
        self._previous = {k: place(k, t) for k, t in state["previous"].items()}

    # -- mechanics ------------------------------------------------------------------------------

    def _check_finite(self, params: Mapping[str, Mapping[Hashable, Tensor]]) -> None:
        grads = [p.grad for ps in params.values() for p in ps.values() if p.grad is not None]
        if not grads or torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()):
            return
        bad = {
            level: [key for key, p in ps.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
            for level, ps in params.items()
        }
        where = "; ".join(f"level {level!r}: {keys[:4]}" for level, keys in bad.items() if keys)
        raise FloatingPointError(
            f"non-finite gradient (NaN or inf) at step {max(self.steps[level] for level in params) + 1} in {where}; "
            "summed, it would poison the level's next update. Lower the learning rate, clip gradients, or fix "
            "the loss that produced it"
        )

    def _accumulate(self, params: Mapping[Hashable, Tensor]) -> None:
        sums, grads = [], []
        for key, p in params.items():
            if p.grad is None:
                continue
            total = self._sums.get(key)
            if total is None:  # first gradient since the last update: the sum so far is zero
                self._sums[key] = p.grad.detach().to(_sum_dtype(p), copy=True)
            else:
                if total.device != p.grad.device:  # loaded without its parameters at hand
                    total = self._sums[key] = total.to(p.grad.device)
                sums.append(total)
                grads.append(p.grad.detach())
            p.grad = None
        if sums:
            torch._foreach_add_(sums, grads)

    def _release(self, level: str, params: Mapping[Hashable, Tensor]) -> None:
        """Hand the level's sums to the optimizer as ``.grad`` and record the surprise statistics."""
        keys = [key for key in params if key in self._sums]
        if not keys:
            return
        sums = [self._sums.pop(key) for key in keys]
        sum_sq = torch.stack(torch._foreach_norm(sums)).square().sum()
        previous = [self._previous.get(key) for key in keys]
        previous = [q.to(s.device) if q is not None and q.device != s.device else q for q, s in zip(previous, sums)]
        if level in self._sum_sq and all(q is not None for q in previous):
            diff_sq = torch.stack(torch._foreach_norm(torch._foreach_sub(sums, previous))).square().sum()
            self._surprise_terms[level] = (diff_sq, self._sum_sq[level])
        self._sum_sq[level] = sum_sq
        for key, total in zip(keys, sums):
            p = params[key]
            # a copy: clipping scales .grad in place, and the sum is kept for the next surprise
            p.grad = total.to(p.dtype, copy=True)
            self._previous[key] = total


def parameter_label(group: Mapping, i: int, p: Tensor) -> str:
    """``parameter 'name'`` from the group's ``param_names``, else its index and shape (for messages)."""
    names = group.get("param_names")
    if not names:
        return f"parameter #{i} (shape {tuple(p.shape)})"
    if len(names) != len(group["params"]):  # ZeRO replaced the group's tensors by flat partitions
        return f"parameter #{i} (a flat partition of {', '.join(map(repr, names[:3]))}{', …' if len(names) > 3 else ''})"
    return f"parameter {names[i]!r}"


def check_finite_gradients(param_groups: list[dict]) -> None:
    """Raise ``FloatingPointError`` naming the first parameter with a nan/inf gradient (one sync).

    Shared by the optimizers that must refuse a poisoned step before touching weights or state
    (DGD, DMGD, Muon, M3).
    """
    grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
    if not grads or torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()):
        return
    for index, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            if p.grad is not None and not torch.isfinite(p.grad).all():
                where = f"param group {index}" + (f" ({group['name']!r})" if "name" in group else "")
                raise FloatingPointError(
                    f"non-finite gradient (nan/inf) in {parameter_label(group, i, p)} of {where}; nothing was "
                    "updated. Lower the learning rate, clip gradients (trainer.gradient_clip_val) or find the "
                    "overflow in the loss"
                )


def _sum_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


class LevelAwareOptimizer(torch.optim.Optimizer):
    """Mixin that makes a torch optimizer honour ``period`` on its param groups.

    Combine it with an optimizer class, mixin first (``make_level_aware(torch.optim.AdamW)``, or
    the ready-made ``LevelAwareAdamW`` / ``LevelAwareSGD``). A group with ``period`` P > 1 is
    updated only at steps P, 2P, … with the sum of its gradients since its last update; other
    steps skip it entirely (its ``.grad`` is ``None`` for the inner step). Groups without
    ``period`` update every step. ``level_stats()`` reports per group ``name`` (``groupN`` when
    unnamed) the update count and surprise (see ``LevelSchedule``).

    ``step(closure)`` evaluates the closure first, so in Lightning the gradient clipping it runs
    applies to each step's gradient before summation. ``state_dict`` carries the gradient sums
    and step counters under ``"level_schedule"``.

    DeepSpeed: ZeRO-1/2 replace each group's parameters by one flat fp32 partition and step the
    base optimizer once per group; each group counts its own steps, so that works. ZeRO-3 steps
    one sub-group at a time (emptying the other groups), which works while every group is a
    single sub-group; a group split into several is refused with the fix.
    Closures that must run more than once per step (LBFGS) are not supported.
    """

    is_level_aware = True

    def add_param_group(self, param_group: dict) -> None:
        check_period(param_group.get("name", f"group{len(self.param_groups)}"), param_group.get("period", 1))
        super().add_param_group(param_group)
        # Groups are identified by object, not position: ZeRO-1/2 narrow ``param_groups`` to one group per call.
        self.__dict__.setdefault("_level_groups", []).append(self.param_groups[-1])

    def step(self, closure=None):
        loss = evaluate_closure(closure)
        self.check_before_step()
        params = {}
        for group in self.param_groups:
            index = self._level_group_index(group)
            if group.get("period", 1) > 1 and group["params"]:  # ZeRO-3 empties the groups it is not stepping
                params[str(index)] = self._bind(index, group["params"])
        self._level_schedule().step(params)
        super().step()
        return loss

    def check_before_step(self) -> None:
        """Checks that must see every gradient before the level schedule sums or releases any of
        them (an optimizer that refuses non-finite gradients raises here); none by default."""

    def level_stats(self) -> dict[str, float]:
        """``"<name>/updates"`` and ``"<name>/surprise"`` for every group name with period > 1."""
        schedule = self._level_schedule()
        by_name: dict[str, list[str]] = {}
        for index, group in enumerate(self._level_groups):
            if group.get("period", 1) > 1:
                by_name.setdefault(group.get("name", f"group{index}"), []).append(str(index))
        stats = {}
        for name, levels in by_name.items():
            stats[f"{name}/updates"] = float(schedule.updates(levels[0]))
            surprise = schedule.surprise(levels)
            if surprise is not None:
                stats[f"{name}/surprise"] = surprise.item()
        return stats

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["level_schedule"] = self._level_schedule().state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        schedule_state = state_dict.pop("level_schedule", None)
        super().load_state_dict(state_dict)
        self._level_groups = list(self.param_groups)  # torch rebuilds the group dicts on load
        self.__dict__.pop("_schedule", None)
        self.__dict__.pop("_bound", None)
        if schedule_state is not None:
            slow = [(i, group["params"]) for i, group in enumerate(self._level_groups) if group.get("period", 1) > 1]
            params = {str(i): self._bind(i, ps) for i, ps in slow} if all(ps for _, ps in slow) else None
            self._level_schedule().load_state_dict(schedule_state, params)

    # -- helpers ----------------------------------------------------------------------------------

    def _level_schedule(self) -> LevelSchedule:
        if "_schedule" not in self.__dict__:
            self._schedule = LevelSchedule({})
        for index in range(len(self._schedule.periods), len(self._level_groups)):  # groups added since
            self._schedule.add_level(str(index), self._level_groups[index].get("period", 1))
        return self._schedule

    def _level_group_index(self, group: dict) -> int:
        for index, known in enumerate(self._level_groups):
            if known is group:
                return index
        raise RuntimeError(
            "a param group reached step() that was never added to this optimizer (param_groups was "
            "replaced); add groups with add_param_group so their periods are counted"
        )

    def _bind(self, index: int, params: list[Tensor]) -> dict[str, Tensor]:
        """The group's parameters by key, refusing a group whose tensors change between steps."""
        bound = self.__dict__.setdefault("_bound", {})
        ids = tuple(map(id, params))
        if bound.setdefault(index, ids) != ids:
            raise RuntimeError(
                f"param group {index} was stepped with different tensors than before. DeepSpeed ZeRO-3 does "
                "this when it splits a group into several sub-groups; raise zero_optimization.sub_group_size "
                "above the largest group's size so that each group is one sub-group, or use ZeRO stage 1 or 2"
            )
        return {f"{index}.{i}": p for i, p in enumerate(params)}


def make_level_aware(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``optimizer_cls`` with ``LevelAwareOptimizer`` mixed in (returned unchanged if it already is)."""
    if issubclass(optimizer_cls, LevelAwareOptimizer):
        return optimizer_cls
    if optimizer_cls in _READY_MADE:  # one class per optimizer, so instances pickle by name
        return _READY_MADE[optimizer_cls]
    return type(
        f"LevelAware{optimizer_cls.__name__}",
        (LevelAwareOptimizer, optimizer_cls),
        {"__module__": __name__, "__doc__": f"{optimizer_cls.__name__} with level-aware stepping."},
    )


class LevelAwareAdamW(LevelAwareOptimizer, torch.optim.AdamW):
    """AdamW whose param groups may carry ``period`` (see ``LevelAwareOptimizer``)."""


class LevelAwareSGD(LevelAwareOptimizer, torch.optim.SGD):
    """SGD whose param groups may carry ``period`` (see ``LevelAwareOptimizer``)."""


_READY_MADE = {torch.optim.AdamW: LevelAwareAdamW, torch.optim.SGD: LevelAwareSGD}
