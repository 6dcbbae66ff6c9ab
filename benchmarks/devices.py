"""``--device`` handling shared by the benchmarks: parse it, refuse what cannot be timed,
synchronize so that host timers measure GPU work rather than the time to queue it, and measure
the peak memory of one call on either device."""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


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


def peak_bytes(run: Callable[[], object], device: torch.device, reset: Callable[[], object] = lambda: None) -> int:
    """Peak total bytes of live tensors allocated during one call of ``run``; tensors that exist
    before the call (parameters, inputs, gradients kept from earlier calls) are not counted, except
    on CPU where the profiler also counts one that the call writes into.
    ``reset`` runs just before the measured call (e.g. to free the gradients an earlier call left,
    so that the measured call allocates them again and they are counted).

    On CUDA the caching allocator's peak counter, after one unmeasured call of ``run`` so that
    what a first call builds (kernels, library workspaces) stays out; on CPU ``torch.profiler``'s
    memory timeline (deprecated in favour of CUDA memory snapshots, which do not cover CPU
    tensors; still the only allocation timeline torch offers for CPU).
    """
    if device.type == "cuda":
        run()
    reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*export_memory_timeline", category=FutureWarning)
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())  # [times, per-category sizes over time]
    return max(sum(s) for s in sizes)
