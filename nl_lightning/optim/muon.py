"""Muon: momentum orthogonalised by Newton–Schulz for hidden matrices, AdamW for everything else.

One optimizer object holds both kinds of parameter. At construction every param group is split in
two: an *orthogonal* half (``group["orthogonal"] = True``: hidden weight matrices, updated with
Newton–Schulz) and an AdamW half (``False``: embeddings, the LM head, norms, biases, gates and any
tensor with a dimension of 1). The split keeps the group's other keys (``period``, ``level``,
``name``, ``weight_decay``), so level-aware stepping and the LR scheduler see ordinary groups.

Routing, per parameter, first rule that applies:

1. ``orthogonal`` set on the param group by the caller → that.
2. fewer than 2 dims, or one of the last two dims is 1 (a vector in disguise, e.g. a depthwise
   conv kernel ``(C, 1, k)``) → AdamW.
3. a dotted component of its name is in ``adamw_modules`` (``embed``, ``head``, …) → AdamW:
   embeddings are lookup tables and the head maps to logits; neither is a hidden linear map, and
   Muon's authors keep both on AdamW. Names come from torch's ``param_names`` on the group (pass
   ``(name, tensor)`` pairs, or ``LanguageModel`` does it for you); without names an embedding is
   indistinguishable from a hidden matrix, so a warning says so.
4. otherwise → orthogonal. A tensor with 3+ dims is a stack of matrices over its leading dims
   (HOPE's per-head projections ``(H, d, d_h)`` and memory initial states ``(H, d_h, d_h)``): each
   matrix is orthogonalised on its own and scaled by its own shape.

Speed: a step orthogonalises all of a group's matrices with one batched Newton–Schulz per
(oriented) shape (``newton_schulz_many``), in ``ns_dtype`` (default: bfloat16 on CUDA, float32 on
CPU, see ``newton_schulz.py``), and the elementwise work (momentum, weight decay, the AdamW half)
uses torch's ``_foreach`` kernels, one launch per list on CUDA instead of one per parameter.

Non-finite gradients raise ``FloatingPointError`` before anything is updated.

DeepSpeed: ZeRO stages 1, 2 and 3 hand the optimizer flat 1-D partitions of each group, so the
2-D shape Newton–Schulz needs is gone; the first step raises an error that says so. ZeRO stage 0
(DeepSpeed without partitioning) and DDP keep the shapes and work.

Plain PyTorch: no Lightning import here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from nl_lightning.optim.level_aware import LevelAwareOptimizer, check_finite_gradients, parameter_label
from nl_lightning.optim.newton_schulz import NS_STEPS, check_ns_dtype, newton_schulz_many, shape_scale

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


class _HybridCore(torch.optim.Optimizer):
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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


class _MuonCore(_HybridCore):
    def __init__(
        self,
        params: Iterable,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = NS_STEPS,
        adamw_lr: float = 3e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_modules: Sequence[str] = ADAMW_MODULES,
        ns_dtype: str | None = None,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum = {momentum} must be in [0, 1)")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, betas=tuple(adamw_betas), eps=adamw_eps)
        super().__init__(params, defaults, adamw_modules, adamw_lr)

    def _matrix_step(self, group: dict, params: list[Tensor]) -> None:
        beta, grads = group["momentum"], [p.grad for p in params]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(buffers, grads, 1 - beta)  # buffer = β·buffer + (1−β)·g
        # Nesterov: look ahead along the momentum, g + β(buffer − g); scale is irrelevant to NS.
        updates = torch._foreach_lerp(grads, buffers, beta) if group["nesterov"] else buffers
        directions = orthogonalised(updates, group["ns_steps"], group.get("ns_dtype"))  # .get: older checkpoints
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, directions, alpha=-group["lr"])


class Muon(LevelAwareOptimizer, _MuonCore):
    """Muon for hidden matrices and AdamW for the rest, in one level-aware optimizer.

    Matrices: ``B ← β B + (1 − β) g``; ``u = g + β (B − g)`` (Nesterov) or ``B``;
    ``W ← W (1 − lr·wd) − lr · NS₅(u) · max(1, rows/cols)^½``. Everything else: AdamW with
    ``adamw_lr``, ``adamw_betas``, ``adamw_eps`` and the group's ``weight_decay``. See the module
    docstring for the routing rules, stacked (3-D) tensors and DeepSpeed.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param groups; groups may carry ``period`` (level-aware
            stepping, see ``LevelAwareOptimizer``), ``orthogonal`` (force the routing) and ``adamw_lr``.
        lr: step size of the orthogonalised updates (~0.02: their RMS is about 1/sqrt(fan-in)).
        momentum: β of the momentum buffer.
        nesterov: orthogonalise the Nesterov look-ahead instead of the buffer.
        weight_decay: decoupled weight decay for both halves (a group's own value wins).
        ns_steps: Newton–Schulz iterations.
        adamw_lr, adamw_betas, adamw_eps: AdamW settings for the non-matrix half.
        adamw_modules: name components whose matrices go to AdamW (embeddings, output heads).
        ns_dtype: Newton–Schulz precision: ``None`` (bfloat16 on CUDA, float32 on CPU, where bf16 matmuls are
            slow) or ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``.
    """
