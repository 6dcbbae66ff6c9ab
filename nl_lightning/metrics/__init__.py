"""torchmetrics ``Metric``s used by the LightningModules."""

from nl_lightning.metrics.language_modeling import BitsPerByte

__all__ = ["BitsPerByte"]
