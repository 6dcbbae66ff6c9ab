"""Training and evaluation on recall tasks: loss and accuracy only where the answer is."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from nl_lightning.metrics import AnswerAccuracy
from nl_lightning.models.layers import attention_memory_excess
from nl_lightning.modules.language_model import LanguageModel

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class RecallModel(LanguageModel):
    """A :class:`LanguageModel` whose batches carry an ``answer_mask``: ``(inputs, targets, answer_mask)``.

    Cross-entropy is taken only on answer bytes (the passkey, the needle's code, MQAR values):
    everything else in the sequence is context the network must read, not text to imitate.
    Optimiser, warm-up/cosine schedule, parameter groups and the vocabulary check are
    LanguageModel's.

    Logged: ``train/loss``, ``train/token_accuracy``; ``val/{loss,accuracy,token_accuracy}`` at the
    training length; ``test/{loss,accuracy,token_accuracy}@<length>`` per test sequence length
    (``accuracy`` = exact match of the whole answer).

    Args (the others are LanguageModel's):
        test_memory_budget_gb: before testing, every ``eval_lengths`` value of the DataModule is
            checked against this many GiB of sliding-window attention scores (the part of the
            memory that grows with the length; ``attention_score_bytes``): a length over it stops
            ``test`` with an error naming it, instead of running out of memory mid-evaluation.
            ``None`` turns the check off.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 100,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        test_memory_budget_gb: float | None = 4.0,
    ) -> None:
        super().__init__(network, optimizer, warmup_steps, lr_schedule, min_lr_ratio)
        if test_memory_budget_gb is not None and test_memory_budget_gb <= 0:
            raise ValueError(f"test_memory_budget_gb must be positive or None (no check), got {test_memory_budget_gb}")
        self.test_memory_budget_gb = test_memory_budget_gb
        # Replace LanguageModel's perplexity/bpb metrics: they are per-byte LM quantities. Test
        # metrics are created per sequence length as lengths appear (see `_stage_metrics`).
        self.metrics = nn.ModuleDict({"val": self._new_metrics()})

    @staticmethod
    def _new_metrics() -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "loss": MeanMetric(nan_strategy="disable"),  # NaN stays visible (see LanguageModel)
                "accuracy": AnswerAccuracy("answer"),
                "token_accuracy": AnswerAccuracy("token"),
            }
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        lengths = list(getattr(datamodule, "eval_lengths", ()))
        if stage == "test":
            self._check_test_memory(lengths, getattr(datamodule, "eval_batch_size", 1))
        for length in lengths:
            self._stage_metrics(f"test@{length}")

    def _check_test_memory(self, lengths: list[int], batch_size: int) -> None:
        if self.test_memory_budget_gb is None:
            return
        budget = self.test_memory_budget_gb
        excess = [e for n in lengths if (e := attention_memory_excess(self.network, n, batch_size, budget))]
        if excess:
            raise ValueError(
                "; ".join(excess) + ". Drop those lengths from data.init_args.eval_lengths, lower "
                "data.init_args.eval_batch_size, raise model.init_args.test_memory_budget_gb (null: no check) "
                "on a machine with that memory, or run `python -m experiments.longctx_eval`, which skips them"
            )

    def _stage_metrics(self, key: str) -> nn.ModuleDict:
        if key not in self.metrics:
            self.metrics[key] = self._new_metrics().to(self.device)
            self._metric_attributes = None  # Lightning caches metric names; let it see the new ones
        return self.metrics[key]

    def _answer_loss(self, logits: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        answer_mask = answer_mask.bool()
        if not answer_mask.any():
            raise ValueError("the batch has no answer positions (answer_mask all False); check the DataModule")
        return F.cross_entropy(logits[answer_mask].float(), targets[answer_mask])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        inputs, targets, answer_mask = batch
        logits = self(inputs)
        loss = self._answer_loss(logits, targets, answer_mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}; lower the "
                "learning rate or set trainer.gradient_clip_val"
            )
        mask = answer_mask.bool()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/token_accuracy", (logits.detach()[mask].argmax(-1) == targets[mask]).float().mean())
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate_recall("val", "", batch)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        length = batch[0].shape[1] + 1  # inputs are the sequence minus its last byte
        self._evaluate_recall(f"test@{length}", f"@{length}", batch)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Greedy predictions for every position (read them where ``answer_mask`` is True)."""
        return self(batch[0]).argmax(-1)

    def _evaluate_recall(self, key: str, suffix: str, batch: Batch) -> None:
        inputs, targets, answer_mask = batch
        logits = self(inputs)
        metrics = self._stage_metrics(key)
        loss = self._answer_loss(logits, targets, answer_mask)
        metrics["loss"].update(loss, weight=answer_mask.sum())
        metrics["accuracy"].update(logits, targets, answer_mask)
        metrics["token_accuracy"].update(logits, targets, answer_mask)
        stage = key.split("@")[0]
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}{suffix}", metric, prog_bar=name == "accuracy", add_dataloader_idx=False)
