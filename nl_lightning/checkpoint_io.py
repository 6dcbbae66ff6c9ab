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
import shutil
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

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        if not _is_local_file_protocol(str(path)):
            return super().load_checkpoint(path, *args, **kwargs)
        return load_readable(lambda p: super(AtomicCheckpointIO, self).load_checkpoint(p, *args, **kwargs), path)


def _neighbours(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name) if path.parent.is_dir() else []
    return (f"other checkpoints in {path.parent}: {', '.join(others)} (resume from one with --ckpt_path <file>)"
            if others else f"no other checkpoint in {path.parent}")


def load_readable(load, path) -> dict[str, Any]:
    """``load(path)``, with a read failure turned into an error that names the file, what is wrong
    and the fix (the other checkpoints beside it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; {_neighbours(path)}")
    try:
        return load(path)
    except Exception as error:  # torch.load's failures on a bad file are of many types
        raise unreadable(path, error) from error


def unreadable(path, error: Exception) -> ValueError:
    """The error for a checkpoint file that ``torch.load`` failed on with ``error``."""
    path = Path(path)
    return ValueError(
        f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}): it is "
        f"truncated or not a checkpoint ({path.stat().st_size:,} bytes); {_neighbours(path)}, or start without "
        "--ckpt_path"
    )


def check_state_dict_matches(module: torch.nn.Module, checkpoint: dict[str, Any], path: str | None,
                             resizable: tuple[str, ...] = ()) -> None:
    """Before a checkpoint's weights are loaded into ``module``: the same parameter names and shapes,
    or an error listing what differs (a checkpoint of another model or preset, or from before a
    level was added) and the fix. ``resizable``: entries whose size the module takes from the
    checkpoint."""
    saved = checkpoint.get("state_dict", {})
    current = module.state_dict()
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    reshaped = [f"{k}: {tuple(saved[k].shape)} saved, {tuple(current[k].shape)} now" for k in current
                if k in saved and k not in resizable and hasattr(saved[k], "shape") and saved[k].shape != current[k].shape]
    if not (missing or unexpected or reshaped):
        return
    parts = [f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
             for items, what in ((missing, "missing from it"), (unexpected, "not in this model"),
                                 (reshaped, "with other shapes")) if items]
    saved_with = checkpoint.get("hyper_parameters", {})
    hint = f"; it was saved with hyper-parameters {saved_with}" if saved_with else ""
    raise ValueError(
        f"checkpoint {path or '(given)'} does not fit this model: {'; '.join(parts)}{hint}. It comes from another "
        "model, preset or level configuration: build the model it was saved from (the same --config files), or "
        "start without --ckpt_path"
    )


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        if hasattr(os, "O_DIRECTORY"):
            handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)


def replace_directory(staging: Path, target: Path) -> None:
    """Put the complete directory ``staging`` at ``target`` (a DeepSpeed checkpoint is a directory).

    Directories cannot be renamed over non-empty ones, so the old one steps aside first
    (``.<name>.old``), the new one takes its name, and only then is the old one deleted. A crash
    between the two renames leaves the old complete checkpoint at ``.<name>.old``, which
    ``recover_directory`` puts back.
    """
    staging, target = Path(staging), Path(target)
    _fsync_tree(staging)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if hasattr(os, "O_DIRECTORY"):
        handle = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(target: Path) -> Path:
    """``target``, or, when a crash interrupted ``replace_directory`` between its renames, the
    previous complete checkpoint put back at ``target``."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)
    return target
