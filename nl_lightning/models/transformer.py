"""Transformer++: pre-norm RMSNorm, RoPE, SwiGLU, causal SDPA, optionally tied embeddings."""

from __future__ import annotations

import torch
from torch import nn

from nl_lightning.models.backbone import LanguageModelBackbone
from nl_lightning.models.config import ModelConfig
from nl_lightning.models.layers import CausalSelfAttention, RMSNorm, SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config.d_model, config.n_head, config.rope_base)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerPP(LanguageModelBackbone):
    """The Transformer++ baseline (Llama-style). ``TransformerPP("tiny")`` or ``TransformerPP(config=cfg)``."""

    is_abstract_base = False

    def build_block(self, index: int) -> nn.Module:
        return TransformerBlock(self.config)
