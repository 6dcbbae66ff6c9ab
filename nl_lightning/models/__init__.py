"""Model families (plain PyTorch, no Lightning import). Every model maps tokens (B, T) → logits (B, T, V)."""

from nl_lightning.models.config import PRESETS, ModelConfig
from nl_lightning.models.transformer import LanguageModelBackbone, TransformerPP

__all__ = ["PRESETS", "LanguageModelBackbone", "ModelConfig", "TransformerPP"]
