"""Feed the layer inputs DGD needs from a Lightning run (the optimizer itself stays Lightning-free)."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning.optim.dgd import DGD, WatchHandle


class DGDInputCapture(Callback):
    """Make every ``DGD`` optimizer of the run watch the ``nn.Linear`` layers it trains.

    In ``on_fit_start`` (after ``configure_optimizers``) it calls ``DGD.watch(pl_module)`` for each
    DGD optimizer, which registers forward pre-hooks that add each training forward's inputs to
    the optimizer's state; ``on_fit_end`` removes the hooks. Recipe::

        trainer:
          callbacks:
            - class_path: nl_lightning.callbacks.DGDInputCapture
        model:
          init_args:
            optimizer:
              class_path: nl_lightning.optim.DGD
              init_args: {lr: 0.05}

    Args:
        require_dgd: raise if the run has no DGD optimizer (a recipe that adds this callback
            but trains with another optimizer is most likely a mistake).
    """

    def __init__(self, require_dgd: bool = True) -> None:
        self.require_dgd = require_dgd
        self._handles: list[WatchHandle] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = [opt for opt in trainer.optimizers if isinstance(_unwrap(opt), DGD)]
        if not optimizers and self.require_dgd:
            names = [type(_unwrap(opt)).__name__ for opt in trainer.optimizers]
            raise MisconfigurationException(
                f"DGDInputCapture found no DGD optimizer (the run uses {names}); set the model's optimizer to "
                "nl_lightning.optim.DGD, or remove the callback (or pass require_dgd=False)"
            )
        for optimizer in optimizers:
            handle = _unwrap(optimizer).watch(pl_module)
            if not len(handle):
                raise MisconfigurationException(
                    "DGDInputCapture: the DGD optimizer trains no nn.Linear weight of this module, so there are no "
                    "inputs to capture; DGD would be plain gradient descent"
                )
            self._handles.append(handle)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)


def _unwrap(optimizer):
    """The torch optimizer inside a wrapper that keeps it as ``.optimizer`` (LightningOptimizer)."""
    return optimizer if isinstance(optimizer, DGD) else getattr(optimizer, "optimizer", optimizer)
