"""DeepSpeed checkpoints that a crash during a save cannot destroy.

A DeepSpeed checkpoint is a directory every rank writes its shards into. ``AtomicDeepSpeedStrategy``
has every rank write into a staging directory beside the target (``.<name>.tmp``), waits for all
of them, and then rank 0 fsyncs the files and swaps the directory into place
(``nl_lightning.checkpoint_io.replace_directory``). Loading puts back the previous checkpoint if a
crash came between the swap's two renames. Importing this module changes nothing about DeepSpeed's
accelerator choice (unlike ``cpu_deepspeed``), so it is the GPU recipes' strategy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy

from nl_lightning.checkpoint_io import recover_directory, replace_directory


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with crash-safe checkpoint directories; same arguments."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        target = Path(self.broadcast(str(filepath)))
        staging = target.with_name(f".{target.name}.tmp")
        if self.is_global_zero and staging.exists():
            shutil.rmtree(staging)  # what a crash during an earlier save left
        self.barrier("atomic_deepspeed_clean")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("atomic_deepspeed_written")  # every rank's shards are in staging
        if self.is_global_zero:
            replace_directory(staging, target)
        self.barrier("atomic_deepspeed_swapped")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if self.is_global_zero:
            recover_directory(Path(checkpoint_path))
        self.barrier("atomic_deepspeed_recovered")
        return super().load_checkpoint(checkpoint_path, weights_only)
