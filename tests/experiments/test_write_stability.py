"""experiments/write_stability.py: the growth table behind the default target, at a test's size."""

from __future__ import annotations

import csv

import experiments.write_stability as study


def test_table_has_every_case_and_the_delta_rule_with_the_value_target_stays_finite(tmp_path):
    out = tmp_path / "write_stability.csv"
    rows = study.main(["--length", "64", "--out", str(out)])
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert tuple(written[0]) == study.COLUMNS and len(written) == len(rows) == len(list(study.cases()))
    delta_value = [r for r in rows if r["rule"] == "delta" and r["target"] == "value"]
    assert len(delta_value) == 8 and all(r["finite"] for r in delta_value)
    assert all(r["max_readout"] < 20 for r in delta_value)
