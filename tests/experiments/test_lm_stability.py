"""experiments/lm_stability.py at a test's size: every run recorded, paired intervals, divergence kept."""

from __future__ import annotations

import csv

import pytest

import experiments.lm_stability as study


def test_short_study_records_every_variant_per_seed_and_the_long_run(tmp_path, text_dir):
    out = tmp_path / "lm.csv"
    rows = study.main([
        "--models", "titans", "--seeds", "0", "1", "--short-steps", "3", "--long-steps", "5", "--val-batches", "1",
        "--data-dir", str(tmp_path / "data"), "--paths", str(text_dir), "--out", str(out),
        "--logs", str(tmp_path / "runs"),
    ])
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert tuple(written[0]) == study.COLUMNS and len(written) == len(rows)
    runs = {(r["variant"], r["seed"], r["steps"]) for r in written}
    by_default = (("delta", "3"), ("paper", "3"), ("delta_shift", "3"), ("delta_shift", "5"))
    assert runs == {(variant, seed, steps) for seed in ("0", "1") for variant, steps in by_default}
    assert all(r["diverged"] == "False" for r in written)
    assert {int(r["step"]) for r in written if r["steps"] == "5"} == {1, 2, 3, 4, 5}


def test_summary_pairs_the_variants_by_seed():
    values = {"delta": (3.0, 3.1), "paper": (3.2, 3.2), "delta_shift": (2.9, 3.15)}
    rows = [dict(model="hope", variant=variant, seed=str(s), steps="120", step="120", val_bpb=str(v), diverged="False")
            for variant, bpbs in values.items() for s, v in enumerate(bpbs)]
    lines = study.summary(rows).splitlines()
    (rules,) = [line for line in lines if "delta vs paper" in line]
    assert "-0.200 / -0.100" in rules and "-0.150 [" in rules
    (shift,) = [line for line in lines if "delta_shift vs delta" in line]
    assert "-0.100 / +0.050" in shift and "-0.025 [" in shift


@pytest.mark.parametrize("variant, write_rule, key_shift",
                         [("delta", "delta", False), ("paper", "paper", False), ("delta_shift", "delta", True)])
def test_variants_set_the_memory_settings_they_name(variant, write_rule, key_shift):
    # Each variant pins both settings, so its runs stay what they were when a default changes.
    assert study.VARIANTS[variant] == {"write_rule": write_rule, "key_shift": key_shift}
    for family in study.FAMILIES.values():
        config = family("tiny", overrides=study.VARIANTS[variant]).config
        assert (config.write_rule, config.key_shift) == (write_rule, key_shift)


def test_the_long_run_trains_the_variant_it_is_given(tmp_path, text_dir):
    rows = study.main([
        "--models", "titans", "--seeds", "0", "--short-steps", "0", "--long-steps", "2", "--long-variant", "delta_shift",
        "--val-batches", "1", "--data-dir", str(tmp_path / "data"), "--paths", str(text_dir),
        "--out", str(tmp_path / "lm.csv"), "--logs", str(tmp_path / "runs"),
    ])
    assert {(r["variant"], r["steps"]) for r in rows} == {("delta_shift", 2)}
