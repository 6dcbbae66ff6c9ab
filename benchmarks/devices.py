"""``--device`` handling shared by the benchmark scripts: parse it, refuse what cannot be timed,
and synchronize so that host timers measure GPU work rather than the time to queue it."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device, refusing what a benchmark cannot time with the fix."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; run on a GPU "
                         "machine with a CUDA build of torch, or pass --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU, where ops run eagerly)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
