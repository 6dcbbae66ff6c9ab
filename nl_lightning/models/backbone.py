"""The language-model frame every family shares: embedding, the family's blocks, final norm, head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nl_lightning.models.config import ModelConfig
from nl_lightning.models.layers import RMSNorm


class LanguageModelBackbone(nn.Module):
    """Embedding → blocks → final norm → LM head. Families differ only in the blocks they build."""

    is_abstract_base = True  # not offered as a recipe choice

    def __init__(self, preset: str = "tiny", overrides: dict[str, Any] | None = None, config: ModelConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ModelConfig.from_preset(preset, **(overrides or {}))
        self.embed = nn.Embedding(self.config.vocab_size, self.config.d_model)
        self.blocks = nn.ModuleList(self.build_block(i) for i in range(self.config.n_layer))
        self.norm = RMSNorm(self.config.d_model, self.config.norm_eps)
        self.head = nn.Linear(self.config.d_model, self.config.vocab_size, bias=False)
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(_init_weights)
        # Layers whose start matters (memory gates, identity convolutions) re-apply their own init.
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()

    def build_block(self, index: int) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must build its blocks")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) integer ids → logits (B, T, vocab_size)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq_len), got {tuple(tokens.shape)}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    # GPT-2 style small normal init keeps early logits near uniform (loss ≈ ln(vocab)).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
