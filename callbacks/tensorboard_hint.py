"""Tell the user where the run's TensorBoard logs are and how to open them."""

from __future__ import annotations

import os

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info


class TensorBoardHint(Callback):
    """Prints the ``tensorboard --logdir ...`` command for the run's logs at the start and end of fit.

    Does nothing when the Trainer has no TensorBoard logger.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._announce(trainer, "logging to")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._announce(trainer, "finished; curves in")

    @staticmethod
    def log_dir(trainer: Trainer) -> str | None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return os.path.abspath(logger.log_dir)
        return None

    def _announce(self, trainer: Trainer, what: str) -> None:
        log_dir = self.log_dir(trainer)
        if log_dir is not None:
            rank_zero_info(f"TensorBoard: {what} {log_dir}\n  open with: tensorboard --logdir {log_dir}")
