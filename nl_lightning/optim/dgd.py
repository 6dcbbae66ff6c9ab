"""DGD, delta gradient descent (SPEC §3; Nested Learning's state-aware update for linear layers).

For the weight W (out × in) of an ``nn.Linear`` the update is

    W ← W (I − η' Â) − lr ∇_W L,     η' = lr · decay,     Â = (Σ_t x_t x_tᵀ) / (Σ_t ‖x_t‖²)

where x_t runs over every token (row of the layer's input, all leading dimensions flattened) the
layer saw since its previous update. This is the L2-regression ("delta rule") view of a linear
layer: besides the gradient step, the weight forgets what it currently maps the present inputs
to, in proportion to how much of the input those directions carry. Every other parameter (and a
linear weight whose inputs were not captured) gets plain gradient descent, ``W ← W − lr ∇_W L``.

How x xᵀ is formed and why: the batch's mean outer product ``A = mean_t x_t x_tᵀ`` matches the
gradient, which is a mean over tokens too, and A is then divided by its trace ``mean_t ‖x_t‖²``.
For a single token this is the normalised delta rule, ``x̂ x̂ᵀ`` with ``x̂ = x/‖x‖`` (DeltaNet's
L2-normalised keys). Â is positive semi-definite with eigenvalues in [0, 1] summing to 1, so the
decay factor ``I − η' Â`` has eigenvalues in [1 − η', 1]: a contraction (never a sign flip) as
long as ``η' ≤ 1``. ``lr · decay > 1`` is refused with a ``ValueError`` at construction and at
every step (a scheduler may raise lr). Without trace normalisation the factor's stability would
depend on the input scale (‖x‖² of a few hundred is ordinary after a norm layer).

How inputs reach the optimizer (it stays Lightning-free): ``DGD.watch(model)`` registers a
forward pre-hook on every ``nn.Linear`` whose weight this optimizer trains. Each forward with
gradients enabled (so not validation under ``no_grad``/``inference_mode``) adds ``Σ_t x_t x_tᵀ``
and ``Σ_t ‖x_t‖²`` (float32 or wider) to the weight's optimizer state; the sums are consumed and
cleared when the weight is updated. Calls from gradient accumulation or activation
checkpointing's recomputation add to both sums alike, so the mean is unchanged.

Use with a ``LanguageModel``: add the callback that calls ``watch`` for you,
``trainer.callbacks: [{class_path: nl_lightning.callbacks.DGDInputCapture}]`` with
``optimizer: {class_path: nl_lightning.optim.DGD, init_args: {lr: …}}``. In plain PyTorch:
``opt = DGD(model.parameters(), lr=0.01); handle = opt.watch(model)`` (``handle.remove()`` undoes).

Cost per watched layer: an in × in state matrix (float32), ``N · in²`` flops per forward for N
tokens (the layer's own matmul costs ``N · in · out``) and ``out · in²`` per update. Linear maps
applied through ``F.linear`` or custom modules are not hooked and get plain GD. Under DDP the sums
are all-reduced before use so that every rank applies the same decay; under DeepSpeed ZeRO the
optimizer sees flat partitions, not the hooked weights, and DGD degrades to plain GD there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nl_lightning.optim.level_aware import LevelAwareOptimizer, check_finite_gradients, evaluate_closure


class WatchHandle:
    """The forward hooks one ``DGD.watch`` call registered; ``remove()`` detaches them."""

    def __init__(self, optimizer: _DeltaGradientDescent, handles: list, weight_ids: list[int]) -> None:
        self._optimizer, self._handles, self.weight_ids = optimizer, handles, weight_ids

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._optimizer._watched.difference_update(self.weight_ids)  # they may be watched again
        self._handles, self.weight_ids = [], []


class _DeltaGradientDescent(torch.optim.Optimizer):
    """The DGD step (see ``DGD``)."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-2,
                 decay: float = 1.0) -> None:
        for name, value in (("lr", lr), ("decay", decay)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, decay=decay))
        self._watched: set[int] = set()
        self._warned_unwatched = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_contraction(self.param_groups[-1], len(self.param_groups) - 1)

    def watch(self, model: nn.Module) -> WatchHandle:
        """Capture the inputs of every ``nn.Linear`` in ``model`` whose weight this optimizer trains.

        Returns a handle whose ``remove()`` detaches the hooks. A weight shared by several layers
        gets the inputs of all of them; watching a weight a second time is refused (its inputs
        would be counted twice).
        """
        trained = {id(p) for group in self.param_groups for p in group["params"]}
        layers = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and id(module.weight) in trained]
        already = [name for name, module in layers if id(module.weight) in self._watched]
        if already:
            raise RuntimeError(
                f"the weights of {already} are already watched by this DGD optimizer; call remove() on the "
                "earlier handle first (or watch the model once)"
            )
        weight_ids = list(dict.fromkeys(id(module.weight) for _, module in layers))
        self._watched.update(weight_ids)
        handles = [module.register_forward_pre_hook(self._capture_hook) for _, module in layers]
        return WatchHandle(self, handles, weight_ids)

    def _capture_hook(self, module: nn.Linear, args: tuple[Any, ...]) -> None:
        if not torch.is_grad_enabled() or not module.weight.requires_grad:
            return  # validation / inference: these inputs are not part of a training step
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
        state = self.state[module.weight]
        if "input_outer" not in state:
            state["input_outer"] = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
            state["input_sq_norm"] = torch.zeros((), dtype=x.dtype, device=x.device)
        state["input_outer"].addmm_(x.T, x)
        state["input_sq_norm"].add_(x.square().sum())

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = evaluate_closure(closure)
        if not self._watched and not self._warned_unwatched:
            warnings.warn(
                "DGD has no watched linear layers, so it steps as plain gradient descent; call "
                "optimizer.watch(model) or add the nl_lightning.callbacks.DGDInputCapture callback",
                stacklevel=2,
            )
            self._warned_unwatched = True
        due = []  # (group index, lr, η', parameter) of every parameter updated now
        for index, group in enumerate(self.param_groups):
            _check_contraction(group, index)
            due += [(index, group["lr"], group["lr"] * group["decay"], p) for p in group["params"]
                    if p.grad is not None]  # None: not due (level-aware period) or unused; inputs are kept
        decaying = [(index, p) for index, _, strength, p in due if strength and "input_outer" in self.state[p]]
        self._reduce_and_check_inputs(decaying)
        for _, lr, strength, p in due:
            state = self.state[p]
            if "input_outer" in state:
                outer, sq_norm = state["input_outer"], state["input_sq_norm"]
                if strength:
                    # Â = A / tr(A); all-zero inputs give A = 0 and so no decay (the floor avoids
                    # 0/0 without a host sync).
                    normalized = outer / sq_norm.clamp_min(torch.finfo(sq_norm.dtype).tiny)
                    p.sub_((p.to(outer.dtype) @ normalized).to(p.dtype), alpha=strength)  # W ← W − η' W Â
                outer.zero_()  # consumed (also at decay 0, so the sums never grow without bound)
                sq_norm.zero_()
            p.add_(p.grad, alpha=-lr)
        return loss

    def _reduce_and_check_inputs(self, decaying: list[tuple[int, Tensor]]) -> None:
        """Sum the captured inputs over DDP ranks, and refuse nan/inf ones before anything changes."""
        if not decaying:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for _, p in decaying:
                dist.all_reduce(self.state[p]["input_outer"])
                dist.all_reduce(self.state[p]["input_sq_norm"])
        self._check_inputs(decaying)

    def _check_inputs(self, captured: list[tuple[int, Tensor]]) -> None:
        states = [self.state[p] for _, p in captured]
        if not states:
            return
        device = states[0]["input_sq_norm"].device
        if torch.stack([torch.isfinite(s["input_sq_norm"]).to(device) for s in states]).all():
            return
        index, p = next((i, p) for (i, p), s in zip(captured, states) if not torch.isfinite(s["input_sq_norm"]))
        raise FloatingPointError(
            f"non-finite inputs (nan/inf) were captured for a linear weight of shape {tuple(p.shape)} in param "
            f"group {index}; nothing was updated. Find the overflow in the forward pass"
        )


def _check_contraction(group: dict[str, Any], index: int) -> None:
    strength = group["lr"] * group["decay"]
    if strength > 1:
        raise ValueError(
            f"DGD's decay factor I − η'Â is no longer a contraction in param group {index}: η' = lr·decay = "
            f"{group['lr']:g}·{group['decay']:g} = {strength:g} > 1; lower decay below {1 / group['lr']:g} "
            "or lower the learning rate"
        )


class DGD(LevelAwareOptimizer, _DeltaGradientDescent):
    """Delta gradient descent: ``W ← W (I − lr·decay·Â) − lr ∇_W L`` for watched ``nn.Linear``
    weights (Â: trace-normalised mean outer product of the layer's inputs), plain GD elsewhere.

    Args:
        lr: step size of the gradient term. decay: η' = lr · decay scales the input-aware decay
            (1: one η' for both terms, the paper's form; 0: plain GD); lr · decay ≤ 1 is required.

    Inputs must be captured: ``handle = opt.watch(model)`` in plain PyTorch, or with a
    ``LanguageModel`` the callback ``nl_lightning.callbacks.DGDInputCapture`` (recipe:
    ``trainer.callbacks: [{class_path: nl_lightning.callbacks.DGDInputCapture}]``). Without any
    watched layer DGD warns once and is plain GD. Module docstring: exact η', how x xᵀ is formed, cost.

    Groups may carry ``period`` (level-aware stepping): a group of period P updates every P steps
    with its summed gradient, and its decay uses the inputs captured over those P steps. The
    captured sums are optimizer state, so ``state_dict`` round-trips mid-cycle. A nan/inf gradient
    or captured input raises ``FloatingPointError`` before the weights change.
    """

    def check_before_step(self) -> None:
        # every gradient and captured input, before the level schedule sums or releases anything
        check_finite_gradients(self.param_groups)
        self._check_inputs([(i, p) for i, group in enumerate(self.param_groups) for p in group["params"]
                            if "input_sq_norm" in self.state.get(p, {})])
