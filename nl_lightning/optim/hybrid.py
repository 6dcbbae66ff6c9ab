"""What Muon and M3 share: hidden matrices get an orthogonalised (Newton–Schulz) update, everything
else (vectors, embeddings, heads) AdamW. ``HybridCore`` routes the parameters, checks them and runs
the AdamW half; ``Muon`` and ``M3`` subclass it and update the matrices their own way."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from nl_lightning.optim.level_aware import check_finite_gradients, evaluate_closure, parameter_label
from nl_lightning.optim.newton_schulz import check_ns_dtype, newton_schulz_many, shape_scale

ADAMW_MODULES = ("embed", "embedding", "embeddings", "tok_embeddings", "wte", "wpe", "head", "lm_head")


def is_matrix(p: Tensor) -> bool:
    """At least 2 dims and a real matrix in the last two (no dimension of 1)."""
    return p.dim() >= 2 and min(p.shape[-2:]) > 1


def split_by_update_rule(params, adamw_modules: Sequence[str], adamw_lr: float) -> list[dict]:
    """Param groups (or a plain list of tensors / (name, tensor) pairs) → groups with ``orthogonal`` set.

    Each input group becomes its orthogonal half then its AdamW half (empty halves dropped); the AdamW
    half takes ``adamw_lr`` (the group's own ``adamw_lr`` if it has one) as its ``lr``.
    """
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    split, unnamed = [], False
    for group in groups:
        group = dict(group)
        tensors, names = _tensors_and_names(group)
        if "orthogonal" in group:  # the caller decided; an AdamW group still takes adamw_lr as its lr
            if group["orthogonal"] and not all(is_matrix(p) for p in tensors):
                shapes = [tuple(p.shape) for p in tensors if not is_matrix(p)]
                raise ValueError(f"a group with 'orthogonal': True holds non-matrices of shapes {shapes}; "
                                 "Newton–Schulz needs 2+ dims with none of the last two equal to 1 — move them "
                                 "to a group with 'orthogonal': False")
            lr = {} if group["orthogonal"] else {"lr": group.get("adamw_lr", adamw_lr)}
            split.append({**group, "params": tensors, **({"param_names": names} if names else {}), **lr})
            continue
        unnamed |= names is None and any(is_matrix(p) for p in tensors)
        names = names or [None] * len(tensors)
        route = [is_matrix(p) and not _named_like(name, adamw_modules) for p, name in zip(tensors, names)]
        meta = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        for orthogonal in (True, False):
            chosen = [(n, p) for n, p, r in zip(names, tensors, route) if r == orthogonal]
            if not chosen:
                continue
            half = {**meta, "params": [p for _, p in chosen], "orthogonal": orthogonal}
            if chosen[0][0] is not None:
                half["param_names"] = [n for n, _ in chosen]
            if not orthogonal:
                half["lr"] = group.get("adamw_lr", adamw_lr)
            split.append(half)
    if unnamed:
        warnings.warn(
            "parameters reached the optimizer without names, so embeddings and the output head cannot be told "
            "from hidden matrices and every matrix is orthogonalised; pass (name, tensor) pairs or 'param_names' "
            "(LanguageModel does), or set 'orthogonal': False on the group that holds them",
            stacklevel=3,
        )
    return split


def _tensors_and_names(group: dict) -> tuple[list[Tensor], list[str] | None]:
    items = list(group["params"]) if not isinstance(group["params"], Tensor) else [group["params"]]
    if items and isinstance(items[0], tuple):
        return [p for _, p in items], [n for n, _ in items]
    return items, group.get("param_names")


def _named_like(name: str | None, modules: Sequence[str]) -> bool:
    return name is not None and any(part in modules for part in name.split("."))


class HybridCore(torch.optim.Optimizer):
    """Shared mechanics: finite checks, the ZeRO check and the AdamW half. Subclasses update matrices."""

    def __init__(self, params, defaults: dict, adamw_modules: Sequence[str], adamw_lr: float) -> None:
        check_ns_dtype(defaults["ns_dtype"])  # fail at construction, not at the first step
        _check_positive(lr=defaults["lr"], adamw_lr=adamw_lr, weight_decay=defaults["weight_decay"],
                        adamw_eps=defaults["eps"])
        for i, beta in enumerate(defaults["betas"]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"adamw_betas[{i}] = {beta} must be in [0, 1)")
        self._adamw_modules, self._adamw_lr = tuple(adamw_modules), adamw_lr
        super().__init__(split_by_update_rule(params, self._adamw_modules, adamw_lr), defaults)

    def add_param_group(self, param_group: dict) -> None:
        check_ns_dtype(param_group.get("ns_dtype"))
        if "orthogonal" not in param_group:  # added after construction: route it now; one group must stay one
            halves = split_by_update_rule([param_group], self._adamw_modules, self._adamw_lr)
            if len(halves) != 1:
                raise ValueError(
                    "this param group mixes hidden matrices with AdamW parameters (vectors, embeddings, heads); "
                    "add them as two groups, or set 'orthogonal': True/False on the group"
                )
            param_group = halves[0]
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = evaluate_closure(closure)
        check_finite_gradients(self.param_groups)
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["orthogonal"]:
                self._check_shapes(index, group)
                self._matrix_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _matrix_step(self, group: dict, params: list[Tensor]) -> None:
        raise NotImplementedError

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        """Decoupled-weight-decay Adam, as ``torch.optim.AdamW`` computes it (bias-corrected moments)."""
        beta1, beta2 = group["betas"]
        by_step: dict[int, list[Tensor]] = {}  # bias corrections depend on each parameter's own step count
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            by_step.setdefault(state["step"], []).append(p)
        for step, ps in by_step.items():
            grads = [p.grad for p in ps]
            exp_avgs = [self.state[p]["exp_avg"] for p in ps]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in ps]
            bias1, bias2 = 1 - beta1**step, 1 - beta2**step
            if group["weight_decay"]:
                torch._foreach_mul_(ps, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denoms, math.sqrt(bias2))
            torch._foreach_add_(denoms, group["eps"])
            torch._foreach_addcdiv_(ps, exp_avgs, denoms, value=-group["lr"] / bias1)

    def _check_shapes(self, index: int, group: dict) -> None:
        for i, p in enumerate(group["params"]):
            if not is_matrix(p):
                raise RuntimeError(
                    f"{type(self).__name__}: {parameter_label(group, i, p)} of param group {index} was routed to Newton–Schulz "
                    f"but now has shape {tuple(p.shape)}. DeepSpeed ZeRO stages 1, 2 and 3 hand the optimizer flat "
                    "1-D partitions, which have no matrix shape to orthogonalise; train with DeepSpeed stage 0 or "
                    "strategy='ddp', or use AdamW under ZeRO"
                )


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise ValueError(f"{key} = {value} must be >= 0")


def orthogonalised(updates: list[Tensor], steps: int, ns_dtype: str | torch.dtype | None) -> list[Tensor]:
    """Newton–Schulz of every update (batched by shape) times its shape scale (see ``shape_scale``)."""
    directions = newton_schulz_many(updates, steps, ns_dtype)
    torch._foreach_mul_(directions, [shape_scale(u.shape) for u in updates])
    return directions
