"""Continual-learning metrics on hand-made accuracy matrices (values worked out by hand below)."""

from __future__ import annotations

import math

import pytest
import torch

from nl_lightning.metrics.continual import (AverageAccuracy, BackwardTransfer, Forgetting, LearningAccuracy,
                                           Retention, continual_summary)

NAN = math.nan

# R[i, j] = accuracy on task j after training task i. Task 0 IMPROVES after task 1 (0.9 → 0.95),
# so forgetting (from the best earlier value) differs from −BWT (from the just-learned value).
R = torch.tensor(
    [
        [0.90, 0.10, 0.20],  # above-diagonal entries (forward transfer) must be ignored
        [0.95, 0.80, NAN],
        [0.30, 0.50, 0.70],
    ]
)


def test_summary_of_full_matrix_matches_hand_computation():
    values = continual_summary(R)
    # ACC = (0.3 + 0.5 + 0.7) / 3
    assert values["average_accuracy"] == pytest.approx(0.5)
    # BWT = ((0.3 − 0.9) + (0.5 − 0.8)) / 2 = (−0.6 − 0.3) / 2
    assert values["backward_transfer"] == pytest.approx(-0.45)
    # F = ((max(0.9, 0.95) − 0.3) + (0.8 − 0.5)) / 2 = (0.65 + 0.3) / 2
    assert values["forgetting"] == pytest.approx(0.475)
    # RET = (0.3 + 0.5) / (0.9 + 0.8)
    assert values["retention"] == pytest.approx(0.8 / 1.7)
    # LA = (0.9 + 0.8 + 0.7) / 3
    assert values["learning_accuracy"] == pytest.approx(0.8)
    assert values["tasks_seen"] == 3


def test_partly_filled_matrix_uses_last_trained_task():
    partial = R.clone()
    partial[2] = NAN  # training of task 2 has not finished
    values = continual_summary(partial)
    assert values["average_accuracy"] == pytest.approx((0.95 + 0.8) / 2)
    assert values["backward_transfer"] == pytest.approx(0.05)  # task 0 got better
    assert values["forgetting"] == pytest.approx(-0.05)  # Chaudhry's F can be negative
    assert values["retention"] == pytest.approx(0.95 / 0.9)  # > 1: later training helped
    assert values["tasks_seen"] == 2


def test_single_task_has_nothing_to_forget():
    values = continual_summary(torch.tensor([[0.7, NAN], [NAN, NAN]]))
    assert values["average_accuracy"] == pytest.approx(0.7)
    assert values["backward_transfer"] == 0.0 and values["forgetting"] == 0.0 and values["retention"] == 1.0


def test_metric_classes_agree_with_summary_and_average_over_runs():
    other = torch.tensor([[1.0, NAN], [0.5, 0.9]])  # ACC .7, BWT −.5, F .5, RET .5, LA .95
    expected = {
        AverageAccuracy: (0.5 + 0.7) / 2,
        BackwardTransfer: (-0.45 - 0.5) / 2,
        Forgetting: (0.475 + 0.5) / 2,
        Retention: (0.8 / 1.7 + 0.5) / 2,
        LearningAccuracy: (0.8 + 0.95) / 2,
    }
    for cls, value in expected.items():
        metric = cls()
        metric.update(R)
        metric.update(other)
        assert metric.compute().item() == pytest.approx(value, abs=1e-6), cls.__name__
        metric.reset()
        metric.update(R)
        assert metric.compute().item() == pytest.approx(continual_summary(R)[cls.key], abs=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.ones(2, 3), "square"),
        (torch.full((2, 2), NAN), "no measurement yet"),
        (torch.tensor([[0.9, NAN], [NAN, 0.8]]), "must be measured"),
        (torch.tensor([[0.0, NAN], [0.0, 0.5]]), "retention is undefined"),
    ],
)
def test_bad_matrices_raise_with_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        continual_summary(bad)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_before_update_raises():
    with pytest.raises(RuntimeError, match="before update"):
        AverageAccuracy().compute()


def test_undefined_retention_is_nan_when_not_strict_and_the_rest_stays_defined():
    R = torch.tensor([[0.0, float("nan")], [0.0, 0.5]])
    values = continual_summary(R, strict=False)
    assert math.isnan(values["retention"])
    assert values["average_accuracy"] == 0.25 and values["learning_accuracy"] == 0.25
