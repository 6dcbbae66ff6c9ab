"""experiments/common.py: what the studies share."""

from __future__ import annotations

import math

import pytest

from experiments.common import key_values, paired_interval


def test_paired_interval_brackets_the_mean_and_collapses_for_one_seed():
    low, high = paired_interval([0.01, 0.03, 0.02])
    assert low <= 0.02 <= high and low >= 0.01 and high <= 0.03
    assert paired_interval([0.05]) == (0.05, 0.05)
    assert all(math.isnan(v) for v in paired_interval([]))


def test_paired_interval_of_many_seeds_excludes_zero_only_when_they_agree():
    low, high = paired_interval([-0.10, -0.12, -0.08, -0.11, -0.09])
    assert high < 0
    low, high = paired_interval([-0.10, 0.12, -0.08, 0.11, -0.09])
    assert low < 0 < high


def test_key_values_reads_yaml_values_and_names_a_malformed_item():
    assert key_values(["a=1", "b=true", "c=[1, 2]", "d=name"], "--set", "a=1") == {"a": 1, "b": True, "c": [1, 2], "d": "name"}
    with pytest.raises(SystemExit, match="--set 'oops': write KEY=VALUE, e.g. --set a=1"):
        key_values(["oops"], "--set", "a=1")
