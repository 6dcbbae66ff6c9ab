"""benchmarks.conv_layout: the forms agree, and a tiny table runs end to end."""

from __future__ import annotations

import pytest
import torch

import benchmarks.conv_layout as bench


def test_every_form_computes_the_same_normalised_convolution():
    conv = bench.CausalDepthwiseConv(12, 3)
    with torch.no_grad():
        conv.conv.weight.normal_()
    x = torch.randn(2, 10, 12)
    outputs = [form(conv, x, 4) for form in bench.FORMS.values()]
    assert len(outputs) == 3
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0])


def test_tiny_table_runs_end_to_end(capsys):
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--batch", "1", "--length", "16", "--dims", "8", "--head-dim", "4", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [row["dim"] for row in rows] == [8]
    row = rows[0]
    # the printed ratios are the ratios of the printed medians, in the order the header says
    assert row["ratio"] == pytest.approx(row["conv1d"] / row["channels-last"])
    assert row["fused_ratio"] == pytest.approx(row["channels-last"] / row["fused"])
    assert "fused ms" in capsys.readouterr().out
