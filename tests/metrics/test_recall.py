"""AnswerAccuracy (metrics/recall.py): exact match of whole answers, and per answer byte."""

import pytest
import torch

from nl_lightning.metrics import AnswerAccuracy


def test_answer_accuracy_counts_whole_answers_and_bytes():
    targets = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    mask = torch.tensor([[False, False, True, True], [False, True, False, True]])
    preds = torch.tensor([[9, 9, 3, 4], [1, 2, 3, 0]])  # row 0 fully right on its answer, row 1 half
    exact, per_byte = AnswerAccuracy("answer"), AnswerAccuracy("token")
    exact.update(preds, targets, mask)
    per_byte.update(torch.nn.functional.one_hot(preds, 10).float(), targets, mask)  # logits work too
    assert exact.compute().item() == pytest.approx(0.5)
    assert per_byte.compute().item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no answer positions"):
        exact.update(preds, targets, torch.zeros_like(mask))
