"""LightningModules: training logic, generic over the networks in ``nl_lightning.models``."""

from nl_lightning.modules.language_model import LanguageModel

__all__ = ["LanguageModel"]
