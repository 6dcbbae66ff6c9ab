"""benchmarks.devices: the peak-memory measurement the benchmarks share."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import DEVICES

import benchmarks.devices as devices


@pytest.mark.parametrize("device", DEVICES)
def test_peak_bytes_counts_what_the_call_allocates_and_not_what_existed_before(device):
    device = torch.device(device)
    existing = torch.ones(4 << 20, device=device)  # 16 MiB alive before and during the call
    kept = []

    def run():
        temporary = torch.ones(2 << 20, device=device)  # 8 MiB, freed before the call returns
        kept.append(temporary.sum() + torch.ones(1 << 20, device=device).sum())  # a 4 MiB temporary
        kept.append(torch.ones(1 << 20, device=device))  # 4 MiB that outlive the call

    peak = devices.peak_bytes(run, device)
    assert 12 << 20 <= peak < 16 << 20, peak  # 8 + 4 MiB live together at most, plus small scalars
    del existing  # referenced until here, so it was alive during the measurement


@pytest.mark.parametrize("device", DEVICES)
def test_peak_bytes_resets_right_before_the_measured_call(device):
    # Like a gradient: the first call allocates it, later calls accumulate into it in place; the
    # reset frees it so the measured call allocates (and counts) it again.
    device = torch.device(device)
    grad, calls = [], []

    def run():
        calls.append("run")
        if grad:
            grad[0].add_(1)
        else:
            grad.append(torch.ones(1 << 20, device=device))  # 4 MiB

    def reset():
        calls.append("reset")
        grad.clear()

    run()  # an earlier call left the "gradient" allocated
    calls.clear()
    assert devices.peak_bytes(run, device, reset=reset) >= 4 << 20
    # On CUDA one unmeasured call first (what a first call builds stays out of the peak).
    assert calls == (["run"] if device.type == "cuda" else []) + ["reset", "run"]
