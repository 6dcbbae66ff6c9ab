"""Evaluations that run a trained model over generated settings (plain functions over a Trainer)."""

from nl_lightning.evaluation.longctx import (
    LengthResult,
    evaluate_by_length,
    log_to_tensorboard,
    plot_accuracy_vs_length,
    read_csv,
    write_csv,
)

__all__ = [
    "LengthResult",
    "evaluate_by_length",
    "log_to_tensorboard",
    "plot_accuracy_vs_length",
    "read_csv",
    "write_csv",
]
