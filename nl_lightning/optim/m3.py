"""M3 (multi-scale momentum Muon): a fast and a slow momentum, both orthogonalised, over a second moment.

Per hidden matrix (routing, stacked tensors, AdamW half, non-finite gradients and DeepSpeed exactly as
in ``muon.py``), at its t-th update with gradient ``g``:

    M¹ ← β₁ M¹ + g                                  fast momentum, every step
    V  ← β₂ V + g²                                  second moment, every step
    S  ← S + g;  every f-th step:  M² ← β₃ M² + S,  S ← 0,  O² ← NS(M²)     slow momentum
    O  = NS(M¹) + α O²                              (NS includes the shape scale, see ``shape_scale``)
    P  = O / √(V + ε)
    U  = P · RMS(O) / RMS(P)     (``normalize_update=True``, default)   or   U = P   (``False``)
    W  ← W (1 − lr·wd) − lr · U

Between its updates the slow momentum is constant, so ``O²`` is computed once per ``f`` steps and
kept in the state. Decays: SPEC §3 writes the accumulations as ``M¹ += β₁ g``, ``V += β₂ g²``,
``M² += β₃ Σ g`` (the paper's associative-memory form). ``betas=(1, 1, 1)`` gives exactly those:
their β multipliers only rescale M¹, M² and V, and NS and the RMS normalisation are scale-invariant
(V's scale only moves ε). Sums that never forget make the step direction ever more dominated by
the distant past, so the defaults decay them (0.95, 0.99, 0.9) like Muon's and Adam's moments.

Why the RMS normalisation is the default: ``O`` has a fixed size (orthogonal, RMS ≈ 1/√fan-in)
whatever the gradient's scale, but ``√V`` is the gradient's scale. Plain division therefore makes
the step ∝ 1/|g|: coordinates with tiny gradients (at the first step V = g², so every coordinate
gets |O|/|g|) take huge steps — tests/optim/test_hybrid.py measures a first update over a thousand times
lr, and python -m benchmarks.optimizers shows the resulting loss. Normalising keeps √V's *relative*
per-coordinate preconditioning and Muon's step size, so ``lr`` means what it means for ``Muon``.

Speed: as in ``muon.py``, one ``newton_schulz_many`` call per step orthogonalises every fast momentum
of the group together with the slow momenta that are due (batched by shape, in ``ns_dtype``).

Plain PyTorch: no Lightning import here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from nl_lightning.optim.hybrid import ADAMW_MODULES, HybridCore, orthogonalised
from nl_lightning.optim.level_aware import LevelAwareOptimizer
from nl_lightning.optim.newton_schulz import NS_STEPS


class _M3Core(HybridCore):
    def __init__(
        self,
        params: Iterable,
        lr: float = 0.02,
        betas: tuple[float, float, float] = (0.95, 0.99, 0.9),
        alpha: float = 0.5,
        slow_period: int = 8,
        eps: float = 1e-8,
        normalize_update: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = NS_STEPS,
        adamw_lr: float = 3e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_modules: Sequence[str] = ADAMW_MODULES,
        ns_dtype: str | None = None,
    ) -> None:
        if len(betas) != 3 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"betas = {betas} must be three decays (fast, second moment, slow) in [0, 1]")
        if isinstance(slow_period, bool) or not isinstance(slow_period, int) or slow_period < 1:
            raise ValueError(f"slow_period = {slow_period!r} must be a positive integer number of steps")
        if not alpha >= 0 or not eps > 0:
            raise ValueError(f"alpha = {alpha} must be >= 0 and eps = {eps} > 0")
        defaults = dict(lr=lr, m3_betas=tuple(betas), alpha=alpha, slow_period=slow_period, m3_eps=eps,
                        normalize_update=normalize_update, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, betas=tuple(adamw_betas), eps=adamw_eps)
        super().__init__(params, defaults, adamw_modules, adamw_lr)

    def _matrix_step(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2, beta3 = group["m3_betas"]
        states, grads = [self.state[p] for p in params], [p.grad for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = 0
                for key in ("fast", "second_moment", "slow", "slow_grad_sum", "slow_update"):
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        fast, second_moment = [s["fast"] for s in states], [s["second_moment"] for s in states]
        torch._foreach_mul_(fast, beta1)
        torch._foreach_add_(fast, grads)
        torch._foreach_mul_(second_moment, beta2)
        torch._foreach_addcmul_(second_moment, grads, grads)
        torch._foreach_add_([s["slow_grad_sum"] for s in states], grads)
        due = [s for s in states if s["step"] % group["slow_period"] == 0]
        for state in due:
            state["slow"].mul_(beta3).add_(state["slow_grad_sum"])
            state["slow_grad_sum"].zero_()
        # One batched Newton–Schulz for the fast momenta and the slow ones that are due.
        directions = orthogonalised(fast + [s["slow"] for s in due], group["ns_steps"], group.get("ns_dtype"))
        directions, slow_directions = directions[: len(fast)], directions[len(fast):]
        for state, slow_direction in zip(due, slow_directions):
            state["slow_update"].copy_(slow_direction)  # a copy: the result is a view into the whole batch
        torch._foreach_add_(directions, [s["slow_update"] for s in states], alpha=group["alpha"])
        denominators = torch._foreach_add(second_moment, group["m3_eps"])
        torch._foreach_sqrt_(denominators)
        updates = torch._foreach_div(directions, denominators)
        if group["normalize_update"]:  # U = P · RMS(O) / RMS(P), per matrix, without a host sync
            sizes = [math.sqrt(p.numel()) for p in params]
            rms_directions = torch._foreach_div(torch._foreach_norm(directions), sizes)
            rms_updates = torch._foreach_div(torch._foreach_norm(updates), sizes)
            torch._foreach_add_(rms_updates, 1e-12)
            torch._foreach_mul_(updates, torch._foreach_div(rms_directions, rms_updates))
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, updates, alpha=-group["lr"])


class M3(LevelAwareOptimizer, _M3Core):
    """Multi-scale momentum Muon (see the module docstring for the update) for hidden matrices, AdamW for the rest.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param groups (``period``, ``orthogonal``, ``adamw_lr`` as
            in ``Muon``).
        lr: step size of the matrix updates (with ``normalize_update`` it has Muon's meaning, ~0.02).
        betas: decays of the fast momentum M¹, the second moment V and the slow momentum M² (1 = pure sums).
        alpha: weight of the slow momentum's orthogonalised direction.
        slow_period: f, the optimizer steps between slow-momentum updates.
        eps: ε in √(V + ε).
        normalize_update: rescale O/√(V+ε) to the RMS of O (default); ``False`` is the plain division, which can
            blow up (module docstring).
        weight_decay: decoupled weight decay for both halves (a group's own value wins).
        ns_steps: Newton–Schulz iterations.
        adamw_lr, adamw_betas, adamw_eps, adamw_modules: the AdamW half, as in ``Muon``.
        ns_dtype: Newton–Schulz precision, as in ``Muon`` (``None``: bfloat16 on CUDA, float32 on CPU).
    """
