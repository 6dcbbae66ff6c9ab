"""Recall accuracy on answer positions (long-context synthetic tasks) as a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Literal

import torch
from torchmetrics import Metric


class AnswerAccuracy(Metric):
    """Accuracy of greedy predictions on the positions ``answer_mask`` marks.

    ``granularity="answer"``: a sequence counts as correct only when *every* answer byte is right
    (exact match of the whole passkey / code / all MQAR values). ``granularity="token"``: the share
    of answer bytes predicted right. Sequences without answer bytes are an error, not a free 1.0.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, granularity: Literal["answer", "token"] = "answer", **kwargs) -> None:
        super().__init__(**kwargs)
        if granularity not in ("answer", "token"):
            raise ValueError(f"granularity must be 'answer' or 'token', got {granularity!r}")
        self.granularity = granularity
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor) -> None:
        """``preds``: predicted ids (B, T) or logits (B, T, V); ``targets``, ``answer_mask``: (B, T)."""
        if preds.dim() == targets.dim() + 1:
            preds = preds.argmax(-1)
        if preds.shape != targets.shape or answer_mask.shape != targets.shape:
            raise ValueError(
                f"preds {tuple(preds.shape)}, targets {tuple(targets.shape)} and answer_mask "
                f"{tuple(answer_mask.shape)} must have the same (batch, time) shape"
            )
        answer_mask = answer_mask.bool()
        answers_per_sequence = answer_mask.sum(-1)
        if (answers_per_sequence == 0).any():
            raise ValueError("a sequence has no answer positions (answer_mask all False); check the data's answer_mask")
        hits = (preds == targets) & answer_mask
        if self.granularity == "answer":
            self.correct += (hits.sum(-1) == answers_per_sequence).sum()
            self.total += targets.shape[0]
        else:
            self.correct += hits.sum()
            self.total += answers_per_sequence.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp_min(1)
