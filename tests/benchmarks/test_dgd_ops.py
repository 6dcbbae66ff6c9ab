"""benchmarks.dgd_ops: a tiny table end to end (on every device here), and reproducible inputs."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import DEVICES

import benchmarks.dgd_ops as dgd_ops


def table_row(capsys, length, impl, device="cpu", rule="dgd"):
    """Run the benchmark on naive and ``impl`` at one tiny length; the cells of its one table row."""
    threads = torch.get_num_threads()
    try:
        dgd_ops.main(["--lengths", str(length), "--dim", "8", "--hidden", "8", "--chunk-size", "8",
                             "--repeats", "1", "--impls", "naive", impl, "--device", device, "--rule", rule])
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {length} |")]
    assert len(rows) == 1
    return [c.strip() for c in rows[0].strip("|").split("|")]


def assert_ratio_and_agreement(cells):
    assert cells[3].endswith("x") and float(cells[3][:-1]) > 0  # naive/impl
    assert float(cells[4]) < 1e-4  # the implementation's output matches the token loop


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_table_runs_end_to_end(device, capsys):
    assert_ratio_and_agreement(table_row(capsys, 16, "chunk", device))


def test_inputs_are_reproducible_leaf_tensors():
    args = type("Args", (), dict(dtype="float32", batch=1, heads=2, dim=4, hidden=4, kind="mlp"))
    seq, weights = dgd_ops.make_inputs(args, 8)
    again, _ = dgd_ops.make_inputs(args, 8, torch.device("cpu"))
    assert all(x.is_leaf and x.requires_grad for x in (*seq.values(), *weights))
    for name in seq:
        torch.testing.assert_close(seq[name], again[name], atol=0, rtol=0)


@pytest.mark.parametrize("rule", ["dgd", "delta"])
def test_fused_cpu_kernel_column_matches_the_token_loop(capsys, rule):
    assert_ratio_and_agreement(table_row(capsys, 20, "cpu", rule=rule))


def test_triton_column_matches_the_token_loop(capsys, triton_device):
    assert_ratio_and_agreement(table_row(capsys, 20, "triton", triton_device))


def test_rule_option_reaches_the_memory():
    """``--rule delta`` times the delta rule with the value target, not the default DGD rule."""
    args = type("Args", (), dict(dtype="float64", batch=1, heads=2, dim=4, hidden=4, kind="mlp", chunk_size=4,
                                 rule="delta"))
    seq, weights = dgd_ops.make_inputs(args, 8)
    timed = dgd_ops.forward_backward(seq, weights, args, "chunk")
    with torch.no_grad():
        delta, _ = dgd_ops.dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4, rule="delta", target="value")
        dgd, _ = dgd_ops.dgd_memory(**seq, weights=weights, kind="mlp", chunk_size=4)
    torch.testing.assert_close(timed, delta)
    assert not torch.allclose(timed, dgd)
