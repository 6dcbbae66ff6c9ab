"""DMGD, deep momentum gradient descent (SPEC §3; Nested Learning's "momentum as a deep memory").

Momentum is an associative memory that compresses the gradient stream. Its linear form is the
heavy-ball buffer ``b ← μ b + u`` (one gradient step, retention μ, on the dot-product objective
``−⟨b, u⟩``). DMGD keeps that buffer and puts a small MLP ``φ_θ`` on top of it, trained online:

    b_{i+1} = μ b_i + u_i                                  (the linear memory absorbs u_i)
    m_{i+1}(u_i) = b_{i+1} + s φ_θ(b_{i+1} / s),  s = rms(b_{i+1})   (the deep read-out)
    W_{i+1} = W_i + σ(m_{i+1}(u_i)),   σ(v) = −lr · v     (or −lr · soft-clip(v), ``nonlinearity="tanh"``)

``φ_θ: ℝ → ℝ`` is ``Σ_h w2_h tanh(w1_h x + c1_h)``, applied to every coordinate with one θ
(3·``hidden`` numbers) per parameter tensor; ``w2 = 0`` at the start, so a fresh DMGD *is*
momentum SGD and the MLP only learns a correction, bounded by ``‖w2‖₁ ≤ 1`` (so ``|m − b| ≤ s``
per coordinate: the memory may reshape the momentum, not blow it up). The input is normalised by
``s`` so the same φ works whatever the tensor's gradient scale.

What θ learns (the memory's own objective, an L2 regression with its own ``memory_lr``): before
absorbing u_i, the memory's bias-corrected read-out ``p_i = (1−μ)/(1−μ^t) · m_i`` (t = updates so
far) is its prediction of the incoming gradient, and θ takes one gradient step on

    ℓ(θ) = ½ mean_j (p_{i,j} − u_{i,j})² / (mean_j u_{i,j}² + mean_j (c b_{i,j})²),  c = (1−μ)/(1−μ^t)

i.e. the memory is trained to make the momentum a better predictor of the next gradient (lower
gradient surprise). ``p`` is what ``DeepMomentum.prediction`` returns, so NestedOptimizer's
surprise ``‖ḡ − m‖ / ‖m‖`` measures exactly the error this objective reduces.

Reduction: with ``hidden=0`` (the linear memory) or ``memory_lr=0`` and ``nonlinearity="identity"``
DMGD is ``torch.optim.SGD(momentum=μ)`` (tested to float64 precision).

Cost per parameter tensor of n elements: state n (the buffer, as SGD) + 3·hidden + 1 numbers.
Per step the memory trains on a strided subset of at most ``MEMORY_SAMPLES`` (4096) coordinates
(θ is shared, so the subset's gradient is an unbiased estimate of the full one; the offset cycles
with the step), and the read-out evaluates φ on all n coordinates: about 4·n·hidden elementwise
operations and n·hidden transient activations: far more than SGD's step, but a few percent of a
training step (measured on HOPE-tiny: benchmarks/RESULTS.md, "Optimizers on HOPE-tiny"). Under
DeepSpeed ZeRO each rank holds a flat partition, so φ is trained and normalised per partition
(per rank) rather than per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from nl_lightning.optim.inner_rules import InnerRule
from nl_lightning.optim.level_aware import LevelAwareOptimizer, check_finite_gradients, evaluate_closure

Nonlinearity = Literal["identity", "tanh"]
NONLINEARITIES = ("identity", "tanh")
MAX_CORRECTION = 1.0  # bound on ‖w2‖₁: the deep read-out differs from b by at most rms(b) per coordinate
MEMORY_SAMPLES = 4096  # coordinates per tensor the memory trains on each step (a strided subset)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _rms(x: Tensor) -> Tensor:
    """Root mean square, floored at the dtype's smallest normal number so that dividing by it is safe."""
    return x.square().mean().sqrt().clamp_min(torch.finfo(x.dtype).tiny)


def _mlp(theta: Tensor, x: Tensor) -> Tensor:
    """φ_θ(x) = Σ_h w2_h tanh(w1_h x + c1_h), elementwise over x."""
    w1, c1, w2 = theta.view(3, -1)
    return torch.tanh(x.unsqueeze(-1) * w1 + c1) @ w2


class DeepMomentum(InnerRule):
    """The DMGD update as an ``InnerRule`` (NestedOptimizer's default; also what ``DMGD`` runs).

    Args:
        momentum: μ, retention of the linear memory (the momentum buffer), in [0, 1).
        hidden: width of the memory MLP φ (0: the linear memory only, i.e. momentum SGD).
        memory_lr: the memory's own learning rate on its L2 regression objective (0 freezes φ).
        nonlinearity: σ on the read-out: ``"identity"`` (update −lr·m) or ``"tanh"``
            (``k tanh(m / k)``, k = ``clip`` · rms(m): coordinates beyond ``clip`` RMS are softly capped).
        clip: soft-clip level of ``"tanh"``, in units of the read-out's RMS.

    State per parameter (tensors only, so it checkpoints): ``momentum_buffer`` (the parameter's
    shape), ``memory`` (θ = w1, c1, w2, 3·hidden numbers in the parameter's dtype) and ``step``
    (updates so far; torch does not cast a state entry named ``step`` on load).
    """

    def __init__(
        self,
        momentum: float = 0.9,
        hidden: int = 8,
        memory_lr: float = 0.01,
        nonlinearity: Nonlinearity = "identity",
        clip: float = 3.0,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"hidden must be an integer >= 0 (0 = plain momentum), got {hidden!r}")
        if not memory_lr >= 0:
            raise ValueError(f"memory_lr must be >= 0, got {memory_lr}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.momentum, self.hidden, self.memory_lr = momentum, hidden, memory_lr
        self.nonlinearity, self.clip = nonlinearity, clip

    def init_state(self, param: Tensor) -> dict[str, Tensor]:
        # w1 = 1 and c1 spread over [−2, 2]: shifted tanh's are a fair basis for a 1-D function of
        # the normalised momentum; w2 = 0 so the rule starts as exact momentum SGD. Deterministic,
        # so building the optimizer never touches the global RNG.
        h = self.hidden
        w1 = torch.ones(h, dtype=param.dtype, device=param.device)
        c1 = torch.linspace(-2.0, 2.0, h, dtype=param.dtype, device=param.device) if h > 1 else torch.zeros_like(w1)
        memory = torch.cat([w1, c1, torch.zeros_like(w1)])
        return {
            "momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format),
            "memory": memory,
            "step": torch.zeros((), dtype=torch.float32),
        }

    def prediction(self, state: dict[str, Tensor], ticks: int) -> Tensor | None:
        if ticks == 0:
            return None
        return self._read(state["memory"], state["momentum_buffer"]) * self._bias_correction(ticks)

    def update(self, state: dict[str, Tensor], grad_sum: Tensor, lr: float) -> Tensor:
        return self.direction(state, grad_sum).mul_(-lr)

    def direction(self, state: dict[str, Tensor], grad_sum: Tensor) -> Tensor:
        """Train the memory on ``grad_sum``, absorb it, and return d = m(u) (soft-clipped for
        ``"tanh"``); the weight update is ``−lr · d``."""
        if self.hidden and self.memory_lr:
            self._train_memory(state, grad_sum)
        buffer = state["momentum_buffer"].mul_(self.momentum).add_(grad_sum)
        state["step"].add_(1)
        read = self._read(state["memory"], buffer)
        if self.nonlinearity == "tanh":
            dtype = _compute_dtype(read)
            k = _rms(read.to(dtype)) * self.clip
            read = (torch.tanh(read.to(dtype) / k) * k).to(read.dtype)
        return read.clone() if read is buffer else read

    # -- the memory ---------------------------------------------------------------------------------

    def _bias_correction(self, ticks: int | Tensor) -> float | Tensor:
        """(1 − μ) / (1 − μᵗ): turns the buffer (a sum) into a running mean of the gradients."""
        return (1 - self.momentum) / (1 - self.momentum**ticks)

    def _read(self, memory: Tensor, buffer: Tensor) -> Tensor:
        """m(b) = b + s φ_θ(b / s), s = rms(b); just b for the linear memory (hidden = 0)."""
        if not self.hidden:
            return buffer
        dtype = _compute_dtype(buffer)
        b = buffer.to(dtype)
        scale = _rms(b)
        return (b + scale * _mlp(memory.to(dtype), b / scale)).to(buffer.dtype)

    def _train_memory(self, state: dict[str, Tensor], target: Tensor) -> None:
        """One gradient step of θ on ½ mean (p − u)² / (mean u² + mean (c b)²), p = c·m(b) the
        bias-corrected read-out.

        Skipped (a zero step) before the first update, when the memory has predicted nothing yet;
        the step count stays a tensor so that this costs no host-device sync.
        """
        memory, steps = state["memory"], state["step"].to(target.device)
        dtype = _compute_dtype(target)
        b, u = state["momentum_buffer"].to(dtype), target.to(dtype)
        scale = _rms(b)
        # θ is shared by all coordinates, so a subset of them gives an unbiased estimate of ∇ℓ.
        # Above MEMORY_SAMPLES coordinates, train on every stride-th one, the offset cycling with
        # the step count (deterministic, so resuming is exact; "step" lives on the CPU, no sync).
        b, u = b.reshape(-1), u.reshape(-1)
        stride = -(-b.numel() // MEMORY_SAMPLES)
        if stride > 1:
            offset = int(state["step"]) % stride
            b, u = b[offset::stride], u[offset::stride]
        correction = self._bias_correction(steps.clamp_min(1).to(dtype))
        # mean u² + mean (c b)²: the scale of the target and of the linear prediction. u alone can
        # be ≈ 0 on one step (a bias whose gradient changes sign), which would blow θ's step up.
        normalizer = (u.square().mean() + (correction * scale).square()).clamp_min(torch.finfo(dtype).tiny)
        # The gradient of ℓ by hand (a 1-hidden-layer MLP): cheaper than autograd's graph, which
        # costs more than the arithmetic for the many small tensors of a model.
        w1, c1, w2 = memory.to(dtype).view(3, -1)
        x = b / scale
        hidden = torch.tanh(torch.outer(x, w1) + c1)  # (n, H)
        error = (b + scale * (hidden @ w2)) * correction - u
        residual = error * (correction * scale / (normalizer * x.numel()))  # ∂ℓ/∂φ per coordinate
        slope = 1 - hidden.square()  # tanh'
        grad = torch.cat([(slope.T @ (residual * x)) * w2, (slope.T @ residual) * w2, hidden.T @ residual])
        # A non-finite memory gradient (e.g. an overflowing read-out) skips the memory's step
        # rather than poisoning θ; the weights' own gradients are checked by the optimizer.
        grad = torch.where(torch.isfinite(grad).all() & (steps > 0), grad, torch.zeros_like(grad))
        memory.sub_(grad.to(memory.dtype), alpha=self.memory_lr)
        # Bound the correction: |s φ(x)| ≤ s ‖w2‖₁ ≤ s · MAX_CORRECTION, i.e. the deep part moves a
        # coordinate by at most one RMS of the buffer. Predicting the gradient alone does not keep
        # the read-out small, and an amplifying memory feeds back into larger gradients.
        w2 = memory.view(3, -1)[2]
        w2.mul_((MAX_CORRECTION / w2.abs().sum().clamp_min(MAX_CORRECTION)).to(w2.dtype))


class _DeepMomentumSGD(torch.optim.Optimizer):
    """The DMGD step on every parameter that has a gradient (see ``DMGD``)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        momentum: float = 0.9,
        hidden: int = 8,
        memory_lr: float = 0.01,
        nonlinearity: Nonlinearity = "identity",
        clip: float = 3.0,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        DeepMomentum(momentum, hidden, memory_lr, nonlinearity, clip)  # validates the rule's arguments
        defaults = dict(lr=lr, momentum=momentum, hidden=hidden, memory_lr=memory_lr, nonlinearity=nonlinearity,
                        clip=clip, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            rule = DeepMomentum(group["momentum"], group["hidden"], group["memory_lr"], group["nonlinearity"],
                                group["clip"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(rule.init_state(p))
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(rule.direction(state, p.grad), alpha=-group["lr"])
        return loss


class DMGD(LevelAwareOptimizer, _DeepMomentumSGD):
    """Deep momentum gradient descent: momentum SGD whose buffer is read through a small MLP
    memory trained online to predict the next gradient (module docstring has the equations).

    Args:
        lr: step size. momentum: μ of the linear memory. weight_decay: decoupled,
            ``W ← W (1 − lr · wd)`` before the update.
        hidden, memory_lr, nonlinearity, clip: the deep memory (see ``DeepMomentum``);
            ``hidden=0`` or ``memory_lr=0`` with ``nonlinearity="identity"`` is exactly
            ``torch.optim.SGD(lr, momentum)``.

    Every argument may be set per param group. Groups may carry ``period`` (level-aware stepping,
    ``nl_lightning.optim.level_aware``): a group of period P updates every P steps with its summed
    gradient, and its memory advances once per update. ``step(closure)`` is supported and
    ``state_dict`` round-trips (buffers, memories, step counters and partial gradient sums).
    A nan/inf gradient raises ``FloatingPointError`` before any weight or state changes.

    Recipe: ``optimizer: {class_path: nl_lightning.optim.DMGD, init_args: {lr: 0.03}}``.
    """

    def check_before_step(self) -> None:
        # every gradient, before the level schedule sums or releases any of them
        check_finite_gradients(self.param_groups)
