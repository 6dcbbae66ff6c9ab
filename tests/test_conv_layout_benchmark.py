"""benchmarks/conv_layout.py: both forms agree, and a tiny table runs end to end."""

from __future__ import annotations

import torch
from conftest import REPO_ROOT, load_script


def test_both_forms_compute_the_same_convolution():
    bench = load_script(REPO_ROOT / "benchmarks/conv_layout.py")
    conv = bench.CausalDepthwiseConv(12, 3)
    with torch.no_grad():
        conv.conv.weight.normal_()
    x = torch.randn(2, 10, 12)
    outputs = [form(conv, x) for form in bench.FORMS.values()]
    torch.testing.assert_close(outputs[0], outputs[1])


def test_tiny_table_runs_end_to_end(capsys):
    bench = load_script(REPO_ROOT / "benchmarks/conv_layout.py")
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--batch", "1", "--length", "16", "--dims", "8", "--head-dim", "4", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [row["dim"] for row in rows] == [8]
    assert rows[0]["ratio"] > 0 and "channels-last ms" in capsys.readouterr().out
