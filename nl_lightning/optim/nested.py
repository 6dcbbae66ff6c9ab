"""NestedOptimizer: multi-timescale consolidation with knowledge bridges (SPEC §4, seed 000).

Plain PyTorch (no Lightning import), so it works the same inside and outside a Trainer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from nl_lightning.optim.bridges import Bridge, bridge_gate, check_contraction, normalized_message, parse_bridges
from nl_lightning.optim.dmgd import DeepMomentum
from nl_lightning.optim.inner_rules import InnerRule
from nl_lightning.optim.level_aware import evaluate_closure
from nl_lightning.optim.presets import resolve_preset

_MIN_THRESHOLD = 0.01  # floor on τ where the adaptive gate divides by it


def _squared_norm(x: Tensor) -> Tensor:
    """‖x‖², accumulated in at least float32 (bf16/fp16 weights would lose the sum)."""
    return torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32)).square()


def scaled_periods(periods: Sequence[int], slowest: int) -> tuple[int, ...]:
    """``periods`` (1 first) respaced so the slowest is ``slowest``, keeping their log-scale spacing."""
    if isinstance(slowest, bool) or not isinstance(slowest, int) or slowest < len(periods):
        raise ValueError(
            f"slowest_period must be an integer of at least {len(periods)} (one distinct period per level "
            f"{list(periods)}), got {slowest!r}"
        )
    top = math.log(periods[-1])
    scaled = [1]
    for period in periods[1:]:
        scaled.append(max(scaled[-1] + 1, round(slowest ** (math.log(period) / top))))
    scaled[-1] = slowest
    return tuple(scaled)


class NestedOptimizer(torch.optim.Optimizer):
    """Levels of one set of weights on nested timescales, pulled together and bridged.

    Levels k = 0…K−1 have periods P_k (``levels``, fastest first, P_0 = 1; collab5: 1, 5, 25,
    125, 625 = UF, F, M, S, US). Level 0 is the model's live weights θ_0; each slower level keeps
    its own weights θ_k in optimizer state. Optimizer steps count from 1. On step t:

    1. Every slower level adds the gradient (taken at the live weights) to its running sum.
    2. Every level with t ≡ 0 (mod P_k) ticks, fastest first: it measures its gradient surprise
       ``s_k = ‖ḡ_k − m_k‖ / (‖m_k‖ + eps)`` (norms over all parameters; ``s_k = 1`` on a first
       tick, which has no prediction m_k yet), applies its inner rule (``inner``, default
       ``DeepMomentum()``: deep momentum, DMGD, with μ = 0.9; ``MomentumSGD(0.9)`` gives
       ``torch.optim.SGD`` semantics) to the summed gradient ḡ_k with the group's lr, and clears
       the sum. m_k is the rule's ``prediction``; for DMGD, the bias-corrected read-out of its
       memory, which that memory is trained online to make equal to ḡ_k. Level 0's ḡ is the
       step's gradient; decoupled ``weight_decay`` (per group) shrinks level 0 only,
       ``θ_0 ← θ_0 (1 − lr · wd)``, before it.
    3. Every bridge i→j whose slower endpoint ticked fires, all from the same snapshot of the
       weights: ``θ_j ← θ_j + γ_ij g_ij N_j(θ_i − θ_j)`` (see ``nl_lightning.optim.bridges``).
       N_j rescales the per-tensor-normalised message to level j's update scale: an EMA
       (``scale_ema``, started at the first value) of the RMS of level j's updates of that
       tensor. ``gate``: ``"adaptive"`` uses ``g = σ(a (s_i − τ)/τ)``, τ being an EMA
       (``gate_ema``) of s_i over the bridge's earlier firings (started at the first value, so
       a first firing is half open) — i.e. ``a_ij = gate_sharpness / τ_ij`` (τ floored at 0.01):
       the gate reads surprise relative to its usual level at this bridge's timescale;
       ``"static"`` uses ``σ(gate_sharpness (s_i − gate_threshold))``;
       ``"fixed"`` is the linear transfer of the baseline, ``θ_j ← θ_j + γ_ij (θ_i − θ_j)``.
    4. The live weights are pulled toward the slower levels:
       ``θ_0 ← θ_0 − lr · reg · Σ_{k>0} w_k (θ_0 − θ_k)``, with ``reg_weights`` w_k
       normalised to sum 1 (default uniform); high ``reg`` retains, low ``reg`` adapts.

    Args:
        params: parameters or param groups. Groups may set ``lr``, ``weight_decay`` and ``reg``;
            other keys (``name``, ``level``) are kept as metadata. A group's ``period`` must be 1
            (or absent): this optimizer runs its own level clock on every group, so a group
            period (e.g. HOPE's CMS groups) would be ambiguous and is refused — train those
            with the NestedScheduler callback or the level-aware optimizer instead.
        preset: ``google3``, ``collab5`` (the default when None), ``adaptability``, ``balanced``
            or ``retention`` (``nl_lightning.optim.presets``). Every other None argument
            takes the preset's value; a non-None one overrides it.
        levels: periods P_k. level_names: one name per level (default UF…US for 5 levels,
            F/M/S for 3, L0… otherwise).
        bridges: ``["UF-F", "F->M", ...]`` (``-`` both ways, ``->`` one way) with γ from
            ``transfer_up`` (fast → slow) / ``transfer_down`` (slow → fast), or a mapping
            ``{"UF-M": 0.2}`` with explicit γ; ``[]`` for none. For every level Σ_i γ_ij < 1.
        reg: λ; ``lr · reg · Σ w_k < 1`` is required (checked at construction and every step).
        slowest_period: the slowest level's period; the others are spaced as the preset's (or
            ``levels``') on a log scale between 1 and it, ``P_k = round(S^(log P_k / log P_{K−1}))``
            (kept strictly increasing): collab5 at S = 84 is 1, 3, 9, 28, 84. For streams whose
            length is not the preset's: e.g. the length of one task in optimizer steps, so that
            every level ticks within each task.
        allow_unstable_pull: permit ``lr · reg · Σ w_k ≥ 1``, where the pull toward the slower
            levels overshoots (an experiment about that regime, e.g. whether the baseline
            collapses there); off by default, and a warning when on.

    State: ``state[p]["levels"][k]`` holds ``weight`` and ``grad_sum`` (k > 0), ``update_rms``
    (0-dim, in p's dtype) and the inner rule's state under ``inner``; counters, surprises, gate
    thresholds and the latest stats are under ``"nested"`` in ``state_dict()``. Non-finite
    gradients raise ``FloatingPointError`` before anything changes; a parameter without a
    gradient counts as a zero gradient, so all levels share one clock.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        preset: str | None = None,
        levels: Sequence[int] | None = None,
        level_names: Sequence[str] | None = None,
        bridges: Sequence[str] | Mapping[str, float] | None = None,
        transfer_up: float | None = None,
        transfer_down: float | None = None,
        reg: float | None = None,
        reg_weights: Sequence[float] | None = None,
        gate: Literal["adaptive", "static", "fixed"] | None = None,
        gate_sharpness: float = 4.0,
        gate_threshold: float = 1.0,
        gate_ema: float = 0.9,
        scale_ema: float = 0.9,
        weight_decay: float = 0.0,
        inner: InnerRule | None = None,
        eps: float = 1e-8,
        slowest_period: int | None = None,
        allow_unstable_pull: bool = False,
    ) -> None:
        if slowest_period is not None:
            levels = scaled_periods(resolve_preset(preset, periods=levels).periods, slowest_period)
        config = resolve_preset(
            preset, periods=levels, level_names=level_names, bridges=bridges, transfer_up=transfer_up,
            transfer_down=transfer_down, reg=reg, reg_weights=reg_weights, gate=gate,
        )
        self.allow_unstable_pull = bool(allow_unstable_pull)
        if self.allow_unstable_pull:
            warnings.warn("NestedOptimizer(allow_unstable_pull=True): lr·reg·Σw ≥ 1 is allowed; the pull toward the "
                          "slower levels can overshoot and oscillate", stacklevel=2)
        for name, value in (("gate_ema", gate_ema), ("scale_ema", scale_ema)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if gate_threshold <= 0 or gate_sharpness <= 0:
            raise ValueError(f"gate_threshold and gate_sharpness must be > 0, got {gate_threshold}, {gate_sharpness}")
        self.periods, self.level_names, self.gate = config.periods, config.level_names, config.gate
        self.bridges: tuple[Bridge, ...] = parse_bridges(
            config.bridges, config.level_names, config.transfer_up, config.transfer_down
        )
        check_contraction(self.bridges, self.level_names)
        total = sum(config.reg_weights)
        self.reg_weights = tuple(w / total for w in config.reg_weights) if total > 0 else ()
        self.inner = DeepMomentum() if inner is None else inner
        if not isinstance(self.inner, InnerRule):
            raise TypeError(
                f"inner must be an InnerRule (e.g. DeepMomentum() or MomentumSGD(0.9)), got {type(self.inner).__name__}"
            )
        self.gate_sharpness, self.gate_threshold, self.gate_ema = gate_sharpness, gate_threshold, gate_ema
        self.scale_ema, self.eps = scale_ema, eps
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, reg=config.reg))
        self._nested = self._fresh_counters()

    # -- torch.optim.Optimizer API --------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        label = f"param group {index}" + (f" ({param_group['name']!r})" if "name" in param_group else "")
        period = param_group.get("period", 1)
        if period != 1:
            raise ValueError(
                f"{label} has period={period}, but NestedOptimizer runs its own levels (periods "
                f"{list(self.periods)}) on every group, so a group period is ambiguous; remove 'period' from the "
                "group (e.g. HOPE with cms_periods all 1), or schedule group periods with the NestedScheduler "
                "callback / level-aware optimizer instead"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("lr", "weight_decay", "reg"):
            if not group[key] >= 0:
                raise ValueError(f"{label} has {key}={group[key]}; use a value >= 0")
        self._check_pull(group, index)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = evaluate_closure(closure)
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        if not params:
            return loss
        self._check_finite()
        for index, group in enumerate(self.param_groups):
            self._check_pull(group, index)  # a scheduler may have raised the lr
        nested = self._nested
        device = params[0][1].device
        if nested["surprise"].device != device:
            self._move_counters(device)
        nested["step"] += 1
        due = [nested["step"] % period == 0 for period in self.periods]
        sums = {key: [[] for _ in self.periods] for key in ("error", "prediction", "update")}
        for group, p in params:
            self._tick_levels(group, p, due, sums)
        self._close_ticks(due, sums)
        firing = [b for b, bridge in enumerate(self.bridges) if due[bridge.slower]]
        coefficients = self._open_gates(firing)
        transfers: list[list[Tensor]] = [[] for _ in firing]
        for group, p in params:
            self._transfer_and_pull(group, p, firing, coefficients, transfers)
        for b, squares in zip(firing, transfers):
            nested["transfer_norm"][b] = torch.stack([s.to(device, torch.float32) for s in squares]).sum().sqrt()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        nested = {k: v.clone() if isinstance(v, Tensor) else list(v) if isinstance(v, list) else v
                  for k, v in self._nested.items()}
        state_dict["nested"] = {**nested, "periods": list(self.periods), "bridges": self._bridge_names()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        nested = state_dict.get("nested")
        if nested is None:
            raise ValueError("this optimizer state was not saved by a NestedOptimizer (no 'nested' entry)")
        if list(nested["periods"]) != list(self.periods) or list(nested["bridges"]) != self._bridge_names():
            raise ValueError(
                f"the state was saved with levels {nested['periods']} and bridges {nested['bridges']}, but this "
                f"optimizer has levels {list(self.periods)} and bridges {self._bridge_names()}; build it with the "
                "same preset/levels/bridges as the run that saved it"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "nested"})
        device = self._nested["surprise"].device
        self._nested = {
            k: v.to(device, copy=True) if isinstance(v, Tensor) else list(v) if isinstance(v, list) else v
            for k, v in nested.items() if k not in ("periods", "bridges")
        }

    # -- monitoring -------------------------------------------------------------------------------

    def level_stats(self) -> dict[str, float]:
        """Latest per-level and per-bridge numbers, for a logger (e.g. NestedScheduler).

        ``level/<L>/ticks``, ``level/<L>/update_norm`` (L2 norm of the level's last update over
        all parameters), ``level/<L>/surprise``; ``bridge/<I>-><J>/fires`` (how often it fired),
        ``bridge/<I>-><J>/gate`` and
        ``bridge/<I>-><J>/transfer_norm`` (L2 norm of its last transfer). Zero before the first
        tick/firing.
        """
        nested = self._nested
        values = torch.cat([nested[k] for k in ("surprise", "update_norm", "gate", "transfer_norm")]).tolist()
        K, names = len(self.periods), self.level_names
        surprise, update_norm = values[:K], values[K : 2 * K]
        gate, transfer_norm = values[2 * K : 2 * K + len(self.bridges)], values[2 * K + len(self.bridges) :]
        stats = {}
        for k, name in enumerate(names):
            stats[f"level/{name}/ticks"] = float(nested["ticks"][k])
            stats[f"level/{name}/update_norm"] = update_norm[k]
            stats[f"level/{name}/surprise"] = surprise[k]
        for b, bridge_name in enumerate(self._bridge_names()):
            # a bridge fires whenever its slower endpoint ticks
            stats[f"bridge/{bridge_name}/fires"] = float(nested["ticks"][self.bridges[b].slower])
            stats[f"bridge/{bridge_name}/gate"] = gate[b]
            stats[f"bridge/{bridge_name}/transfer_norm"] = transfer_norm[b]
        return stats

    # -- the four phases of a step ----------------------------------------------------------------

    def _tick_levels(self, group: dict, p: Tensor, due: list[bool], sums: dict[str, list[list[Tensor]]]) -> None:
        state = self.state[p]
        if not state:
            state["levels"] = [self._init_level(p, k) for k in range(len(self.periods))]
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        for k, level in enumerate(state["levels"]):
            if k > 0:
                level["grad_sum"].add_(grad)
            if not due[k]:
                continue
            grad_sum = grad if k == 0 else level["grad_sum"]
            ticks = self._nested["ticks"][k]
            prediction = self.inner.prediction(level["inner"], ticks)
            if prediction is not None:
                sums["error"][k].append(_squared_norm(grad_sum - prediction))
                sums["prediction"][k].append(_squared_norm(prediction))
            if k == 0 and group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            update = self.inner.update(level["inner"], grad_sum, group["lr"])
            (p if k == 0 else level["weight"]).add_(update)
            update_sq = _squared_norm(update)
            sums["update"][k].append(update_sq)
            rms = (update_sq / max(update.numel(), 1)).sqrt().to(level["update_rms"].dtype)
            if ticks == 0:
                level["update_rms"].copy_(rms)
            else:
                level["update_rms"].mul_(self.scale_ema).add_(rms, alpha=1 - self.scale_ema)
            if k > 0:
                level["grad_sum"].zero_()

    def _close_ticks(self, due: list[bool], sums: dict[str, list[list[Tensor]]]) -> None:
        nested = self._nested
        device = nested["surprise"].device

        def total(squares: list[Tensor]) -> Tensor:
            return torch.stack([s.to(device, torch.float32) for s in squares]).sum().sqrt()

        for k, ticked in enumerate(due):
            if not ticked:
                continue
            if nested["ticks"][k] > 0:
                nested["surprise"][k] = total(sums["error"][k]) / (total(sums["prediction"][k]) + self.eps)
            else:
                nested["surprise"][k] = 1.0  # no prediction yet: count the whole gradient as new
            nested["update_norm"][k] = total(sums["update"][k])
            nested["ticks"][k] += 1

    def _open_gates(self, firing: list[int]) -> list[Tensor]:
        """Gate values of the firing bridges (recorded, τ advanced); returns γ·g per bridge."""
        if not firing:
            return []
        nested = self._nested
        index = torch.tensor(firing, device=nested["gate"].device)
        if self.gate == "fixed":
            gates = torch.ones(len(firing), device=index.device)
        else:
            surprise = nested["surprise"][torch.tensor([self.bridges[b].source for b in firing], device=index.device)]
            threshold = nested["threshold"][index]
            if self.gate == "adaptive":
                first = [nested["ticks"][self.bridges[b].slower] == 1 for b in firing]
                first = torch.tensor(first, device=index.device)
                threshold = torch.where(first, surprise, threshold)  # the EMA starts at its first value
                gates = bridge_gate(surprise, self.gate_sharpness / threshold.clamp_min(_MIN_THRESHOLD), threshold)
                nested["threshold"][index] = self.gate_ema * threshold + (1 - self.gate_ema) * surprise
            else:
                gates = bridge_gate(surprise, self.gate_sharpness, threshold)
        nested["gate"][index] = gates
        return [gates[n] * self.bridges[b].transfer for n, b in enumerate(firing)]

    def _transfer_and_pull(
        self, group: dict, p: Tensor, firing: list[int], coefficients: list[Tensor], transfers: list[list[Tensor]]
    ) -> None:
        levels = self.state[p]["levels"]
        weights = [p] + [level["weight"] for level in levels[1:]]
        incoming: dict[int, Tensor] = {}
        for n, b in enumerate(firing):  # every message from the same snapshot, applied afterwards
            bridge = self.bridges[b]
            difference = weights[bridge.source] - weights[bridge.target]
            if self.gate == "fixed":
                message = difference.mul_(bridge.transfer)
            else:
                scale = levels[bridge.target]["update_rms"] * coefficients[n].to(p.device)
                message = normalized_message(difference, scale)
            transfers[n].append(_squared_norm(message))
            incoming[bridge.target] = incoming[bridge.target].add_(message) if bridge.target in incoming else message
        for target, message in incoming.items():
            weights[target].add_(message)
        strength = group["lr"] * group["reg"]
        if strength and self.reg_weights:
            pull = torch.zeros_like(p)
            for w, weight in zip(self.reg_weights, weights[1:]):
                if w:
                    pull.add_(p - weight, alpha=w)
            p.sub_(pull, alpha=strength)

    # -- helpers ------------------------------------------------------------------------------------

    def _init_level(self, p: Tensor, k: int) -> dict[str, Any]:
        level: dict[str, Any] = {"update_rms": torch.zeros((), dtype=p.dtype, device=p.device)}
        if k > 0:
            level["weight"] = p.detach().clone(memory_format=torch.preserve_format)
            level["grad_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        level["inner"] = self.inner.init_state(p)
        return level

    def _fresh_counters(self) -> dict[str, Any]:
        first = next((p for group in self.param_groups for p in group["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        K, B = len(self.periods), len(self.bridges)
        return {
            "step": 0,
            "ticks": [0] * K,
            "surprise": torch.zeros(K, device=device),
            "update_norm": torch.zeros(K, device=device),
            "threshold": torch.full((B,), float(self.gate_threshold), device=device),
            "gate": torch.zeros(B, device=device),
            "transfer_norm": torch.zeros(B, device=device),
        }

    def _move_counters(self, device: torch.device) -> None:
        self._nested = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self._nested.items()}

    def _bridge_names(self) -> list[str]:
        return [bridge.name(self.level_names) for bridge in self.bridges]

    def _check_pull(self, group: dict, index: int) -> None:
        strength = group["lr"] * group["reg"] * sum(self.reg_weights)
        if strength >= 1 and not self.allow_unstable_pull:
            raise ValueError(
                f"the λ pull on level {self.level_names[0]} (the live weights) is unstable in param group {index}: "
                f"lr·reg·Σw = {group['lr']:g}·{group['reg']:g}·{sum(self.reg_weights):g} = {strength:g} ≥ 1; "
                f"lower "
                f"reg below {1 / (group['lr'] * sum(self.reg_weights)):g} or lower the learning rate "
                "(allow_unstable_pull=True permits it, for experiments about that regime)"
            )

    def _check_finite(self) -> None:
        with_grads = [(g, i, p) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])
                      if p.grad is not None]
        if not with_grads:
            return
        device = with_grads[0][2].device
        if torch.stack([torch.isfinite(p.grad).all().to(device) for _, _, p in with_grads]).all():
            return
        g, i, p = next((g, i, p) for g, i, p in with_grads if not torch.isfinite(p.grad).all())
        names = self.param_groups[g].get("param_names")
        label = repr(names[i]) if names else f"#{i} (shape {tuple(p.shape)})"
        raise FloatingPointError(
            f"non-finite gradient (nan/inf) in parameter {label} of param group {g} at optimizer step "
            f"{self._nested['step'] + 1}; nothing was updated. Lower the learning rate, clip gradients "
            "(trainer.gradient_clip_val) or find the overflow in the loss"
        )

