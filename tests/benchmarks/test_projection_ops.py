"""benchmarks.projection_ops: a tiny table end to end, for the CPU kernel and (under the
interpreter without a GPU) the Triton writes."""

from __future__ import annotations

import pytest
import torch

import benchmarks.projection_ops as projection_ops


def table_row(capsys, impl, device, rule):
    threads = torch.get_num_threads()
    try:
        projection_ops.main(["--lengths", "24", "--dim", "16", "--hidden", "8", "--chunk-size", "8", "--batch", "2",
                             "--repeats", "1", "--impls", "chunk", impl, "--device", device, "--rule", rule])
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 24 |")]
    assert len(rows) == 1
    return [c.strip() for c in rows[0].strip("|").split("|")]


def assert_ratio_and_agreement(cells):
    assert cells[3].endswith("x") and float(cells[3][:-1]) > 0  # chunk/impl
    assert float(cells[4]) < 1e-5  # the implementation's read-outs match the chunk path's


@pytest.mark.parametrize("rule", ["delta", "dgd"])
def test_tiny_table_runs_end_to_end_with_the_cpu_kernel(capsys, rule):
    assert_ratio_and_agreement(table_row(capsys, "cpu", "cpu", rule))


def test_tiny_table_runs_end_to_end_with_the_triton_writes(capsys, triton_device):
    assert_ratio_and_agreement(table_row(capsys, "triton", triton_device, "delta"))


def test_the_baseline_must_come_first():
    with pytest.raises(SystemExit):
        projection_ops.main(["--impls", "cpu", "chunk"])
