"""Accuracy vs context length for a trained :class:`RecallModel`: one ``trainer.test`` per length.

Each length is tested on its own so one that does not fit is skipped with a message instead of
ending the whole evaluation; what fits is estimated beside the attention
(``models.layers.attention_score_bytes``), and only a real out-of-memory error skips a length
that the estimate passed.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from nl_lightning.models.layers import attention_memory_excess


@dataclass(frozen=True)
class LengthResult:
    """One (model, task, length) point. ``status`` is ``ok`` or ``skipped: <why>`` (accuracies NaN)."""

    model: str
    task: str
    length: int
    accuracy: float
    token_accuracy: float
    num_samples: int
    seconds: float
    status: str = "ok"


def evaluate_by_length(
    trainer: Trainer,
    model: LightningModule,
    datamodule: LightningDataModule,
    lengths: list[int],
    model_name: str,
    memory_budget_gb: float = 2.0,
    log: Callable[[str], None] = print,
) -> list[LengthResult]:
    """Test ``model`` at every length in ``lengths`` (``datamodule`` must be a RecallDataModule).

    A length whose attention-score estimate exceeds ``memory_budget_gb``, or that raises an
    out-of-memory error, is reported as skipped with the reason.
    """
    if memory_budget_gb <= 0:
        raise ValueError(f"memory_budget_gb must be positive, got {memory_budget_gb}")
    original = datamodule.eval_lengths, getattr(model, "test_memory_budget_gb", None)
    # This loop skips what does not fit, so the model's own guard (which stops `nl-lightning test`
    # with an error) uses the same budget and never fires on a length that passed here.
    if hasattr(model, "test_memory_budget_gb"):
        model.test_memory_budget_gb = memory_budget_gb
    results = []
    try:
        for length in sorted(lengths):
            excess = attention_memory_excess(model.network, length, datamodule.eval_batch_size, memory_budget_gb)
            if excess is not None:
                reason = f"skipped: {excess} (raise --memory-budget-gb, or use a GPU)"
                log(f"{model_name} @ {length}: {reason}")
                results.append(LengthResult(model_name, datamodule.task, length, float("nan"), float("nan"), 0, 0.0, reason))
                continue
            datamodule.eval_lengths = [length]
            started = time.perf_counter()
            try:
                (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
            except (torch.OutOfMemoryError, MemoryError) as error:
                reason = f"skipped: out of memory at {length} ({type(error).__name__}); lower eval_batch_size or use a GPU"
                log(f"{model_name} @ {length}: {reason}")
                results.append(LengthResult(model_name, datamodule.task, length, float("nan"), float("nan"), 0, 0.0, reason))
                continue
            seconds = time.perf_counter() - started
            result = LengthResult(
                model_name, datamodule.task, length, round(float(metrics[f"test/accuracy@{length}"]), 4),
                round(float(metrics[f"test/token_accuracy@{length}"]), 4), datamodule.num_test, round(seconds, 1),
            )
            log(f"{model_name} @ {length}: accuracy {result.accuracy:.3f} (per byte {result.token_accuracy:.3f}) "
                f"on {result.num_samples} samples in {seconds:.0f}s")
            results.append(result)
    finally:
        datamodule.eval_lengths = original[0]
        if hasattr(model, "test_memory_budget_gb"):
            model.test_memory_budget_gb = original[1]
    return results


def write_csv(results: list[LengthResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as sink:
        writer = csv.DictWriter(sink, fieldnames=[f.name for f in fields(LengthResult)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    return path


def read_csv(path: str | Path) -> list[LengthResult]:
    with open(path, newline="") as source:
        return [
            LengthResult(row["model"], row["task"], int(row["length"]), float(row["accuracy"]),
                         float(row["token_accuracy"]), int(row["num_samples"]), float(row["seconds"]), row["status"])
            for row in csv.DictReader(source)
        ]


def plot_accuracy_vs_length(results: list[LengthResult], train_length: int | None = None):
    """A matplotlib Figure: exact-match accuracy (solid) and per-byte accuracy (dashed) per model,
    log₂ length axis; skipped lengths are marked with an x on the axis, ``train_length`` (if given)
    with a vertical line: left of it is in-distribution, right of it extrapolation."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the evaluation runs on servers and in tests
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    tasks = sorted({r.task for r in results})
    for name in dict.fromkeys(r.model for r in results):
        points = sorted((r for r in results if r.model == name), key=lambda r: r.length)
        done = [r for r in points if r.status == "ok"]
        line, = ax.plot([r.length for r in done], [r.accuracy for r in done], marker="o", label=f"{name} (exact)")
        ax.plot([r.length for r in done], [r.token_accuracy for r in done], ls="--", color=line.get_color(), alpha=0.6)
        skipped = [r.length for r in points if r.status != "ok"]
        if skipped:
            ax.plot(skipped, [0.0] * len(skipped), "x", color=line.get_color(), ms=9, label=f"{name} (skipped)")
    if train_length is not None:
        ax.axvline(train_length, color="gray", ls=":", label=f"training length ({train_length})")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (bytes)")
    ax.set_ylabel("accuracy (solid: whole answer, dashed: per byte)")
    ax.set_title(f"Long-context recall: {', '.join(tasks)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def log_to_tensorboard(writer, results: list[LengthResult], figure=None, prefix: str = "longctx") -> None:
    """Scalars ``<prefix>/<task>/<model>/accuracy`` with the *length* as the step, plus the figure."""
    for r in results:
        if r.status == "ok":
            writer.add_scalar(f"{prefix}/{r.task}/{r.model}/accuracy", r.accuracy, global_step=r.length)
            writer.add_scalar(f"{prefix}/{r.task}/{r.model}/token_accuracy", r.token_accuracy, global_step=r.length)
    if figure is not None:
        writer.add_figure(f"{prefix}/accuracy_vs_length", figure)
    writer.flush()
