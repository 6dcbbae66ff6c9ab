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

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from nl_lightning.optim.hybrid import ADAMW_MODULES, HybridCore, orthogonalised
from nl_lightning.optim.level_aware import LevelAwareOptimizer
from nl_lightning.optim.newton_schulz import NS_STEPS


class _MuonCore(HybridCore):
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
