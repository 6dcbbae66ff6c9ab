"""LightningModules: training logic, generic over the networks in ``nl_lightning.models``."""

from nl_lightning.modules.language_model import LanguageModel
from nl_lightning.modules.recall import RecallModel
from nl_lightning.modules.continual import ContinualClassifier

__all__ = ["ContinualClassifier", "LanguageModel", "RecallModel"]
