"""Crash-safe checkpoint files: a checkpoint on disk is the old complete one or the new complete one.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
the system temp directory; committing it moves the file, which across file systems is a copy, and
nothing is fsynced. A machine crash during that copy leaves a truncated ``last.ckpt`` (resuming then
fails with ``OSError: [Errno 22] Invalid argument``). ``AtomicCheckpointIO`` writes the bytes to a
temporary file in the checkpoint's own directory, flushes and fsyncs it, renames it over the target
(``os.replace``: atomic on POSIX and Windows within one file system), then fsyncs the directory so
the rename itself survives a crash. A process killed mid-save leaves at most a stray
``.<name>.tmp-<pid>`` file beside the intact checkpoint.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the rename is durable once the directory entry is on disk
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (``atomic_write``); remote
    paths (``s3://`` …) keep Lightning's own transaction. The ``nl-lightning`` CLI uses it by
    default; in your own project pass ``Trainer(plugins=[AtomicCheckpointIO()])``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(buffer.getbuffer(), path)
