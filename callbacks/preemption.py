"""Save a checkpoint when the run is told to stop (SIGTERM), and keep the RNG in every checkpoint."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(Callback):
    """On SIGTERM (a preempted job, ``kill``, Ctrl-\\ of a scheduler), write ``last.ckpt`` and exit 0.

    Lightning stops after the step in flight when it receives SIGTERM and raises
    ``SIGTERMException``; this callback then saves the full training state into the
    ``ModelCheckpoint`` directory as ``last.ckpt`` (written atomically by the CLI's checkpoint IO), so
    ``--ckpt_path last`` resumes there. Every checkpoint also carries the RNG states (torch, numpy,
    python), restored on resume, so a resumed run draws the numbers the uninterrupted one would
    (with ``ByteLMDataModule``'s resumable batch order it repeats it bit for bit).
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = trainer.checkpoint_callback
        directory = getattr(checkpoint, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(directory, "last.ckpt")
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")

    def state_dict(self) -> dict[str, Any]:
        # Tensors, ints and tuples only: checkpoints stay loadable with torch.load(weights_only=True).
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch" not in state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        kind, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
