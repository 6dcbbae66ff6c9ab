"""Model families (plain PyTorch, no Lightning import). Every model maps tokens (B, T) → logits (B, T, V)."""

from nl_lightning.models.classifiers import CMSClassifier, CNNClassifier, MLPClassifier
from nl_lightning.models.config import PRESETS, ModelConfig
from nl_lightning.models.hope import Hope
from nl_lightning.models.titans import Titans
from nl_lightning.models.backbone import LanguageModelBackbone
from nl_lightning.models.transformer import TransformerPP

__all__ = [
    "CMSClassifier",
    "CNNClassifier",
    "Hope",
    "LanguageModelBackbone",
    "MLPClassifier",
    "ModelConfig",
    "PRESETS",
    "Titans",
    "TransformerPP",
]
