"""torchmetrics ``Metric``s used by the LightningModules."""

from nl_lightning.metrics.continual import (
    AverageAccuracy,
    BackwardTransfer,
    Forgetting,
    LearningAccuracy,
    Retention,
    continual_summary,
)
from nl_lightning.metrics.language_modeling import BitsPerByte
from nl_lightning.metrics.recall import AnswerAccuracy

__all__ = [
    "AverageAccuracy",
    "BackwardTransfer",
    "Forgetting",
    "LearningAccuracy",
    "Retention",
    "continual_summary",
    "BitsPerByte",
    "AnswerAccuracy",
]
