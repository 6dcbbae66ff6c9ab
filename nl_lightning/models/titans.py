"""Titans (LMM): neural long-term memory layers interleaved with sliding-window attention.

The memory layer (SPEC §2): k = xW_K, v = xW_V, q = xW_Q (after a short causal convolution, keys
and queries L2-normalised per head), data-dependent gates in (0, 1) and the read-out
y_t = M_t(q_t) of the memory after token t's write. How it writes is ``config.write_rule``:

* ``"delta"`` (default): the normalised delta rule of ``nl_lightning.ops.dgd`` (``naive.py`` has
  its equations and state bound), gates β_t (the fraction of the error a token corrects) and α_t
  (forgetting; the state keeps 1 − α_t);
* ``"paper"``: Titans' surprise-with-momentum rule of ``nl_lightning.ops.titans``, gates θ_t
  (inner learning rate, capped at σ·(1 − η)/C), η_t (momentum) and α_t (forgetting).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nl_lightning.models.backbone import LanguageModelBackbone
from nl_lightning.models.config import ModelConfig
from nl_lightning.models.layers import (
    CausalDepthwiseConv,
    CausalSelfAttention,
    RMSNorm,
    SwiGLU,
    gate_bias,
    merge_heads,
    split_heads,
    without_first_key,
)
from nl_lightning.ops.dgd import dgd_memory
from nl_lightning.ops.titans import titans_memory


class TitansMemoryLayer(nn.Module):
    """Token mixer built on the Titans memory: one memory state per batch element and head."""

    # Starting gates of the paper's rule: a moderate inner step, strong momentum, little forgetting.
    INITIAL_GATES = {"theta": 0.5, "eta": 0.9, "alpha": 0.01}
    # Starting gates of the delta rule: half of each error corrected, little forgetting.
    INITIAL_DELTA_GATES = {"beta": 0.5, "alpha": 0.01}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h, hd = config.d_model, config.n_head, config.head_dim
        self.config = config
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        # channels: queries, keys, values; keys start from the previous token under key_shift
        self.conv = CausalDepthwiseConv(3 * d, config.conv_kernel, shifted=(d, 2 * d) if config.key_shift else None)
        self.gates = nn.Linear(d, len(self.initial_gates) * h)  # one value per gate and head
        if config.memory_kind == "linear":
            self.memory_weights = nn.ParameterList([nn.Parameter(torch.zeros(h, hd, hd))])
        else:  # residual MLP starting near the identity map
            self.memory_weights = nn.ParameterList(
                [nn.Parameter(torch.randn(h, hd, hd) * 0.02), nn.Parameter(torch.randn(h, hd, hd) / math.sqrt(hd))]
            )
        self.out_norm = RMSNorm(d, config.norm_eps)
        self.proj = nn.Linear(d, d, bias=False)
        self.init_weights()

    @property
    def initial_gates(self) -> dict[str, float]:
        return self.INITIAL_DELTA_GATES if self.config.write_rule == "delta" else self.INITIAL_GATES

    def init_weights(self) -> None:
        """Gates start input-independent at their initial values; the input weights then learn to modulate them."""
        h = self.config.n_head
        with torch.no_grad():
            self.gates.weight.zero_()
            self.gates.bias.copy_(torch.tensor([gate_bias(v) for v in self.initial_gates.values()]).repeat_interleave(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h = self.config, self.config.n_head
        qkv = self.qkv(x)
        # Convolution, then queries and keys (the first 2·d channels) L2-normalised per head.
        qkv = self.conv(qkv, normalized=2 * c.d_model, group=c.head_dim, impl=c.memory_impl)
        q, k, v = (split_heads(t, h) for t in qkv.chunk(3, dim=-1))
        if c.key_shift:
            k = without_first_key(k)
        gates = torch.sigmoid(self.gates(x)).transpose(1, 2).chunk(len(self.initial_gates), dim=1)  # (B, H, T) each
        if c.write_rule == "delta":
            beta, forget = gates
            # Unit keys and β ∈ (0, 1): every token's transition is a contraction whatever the
            # chunk size, so the step needs no cap (ops/dgd/naive.py states the bound).
            y, _ = dgd_memory(
                q, k, v, beta, 1 - forget, tuple(self.memory_weights), kind=c.memory_kind,
                chunk_size=c.chunk_size, impl=c.memory_impl, rule="delta", target=c.memory_target,
            )
            return self.proj(self.out_norm(merge_heads(y)))
        gate_theta, eta, alpha = gates
        # Inner step θ_t = σ(·)(1 − η_t)/C. Within a chunk all C gradients are taken at the
        # chunk-start state and momentum sums them with weight up to 1/(1 − η); on repetitive
        # text (coherent keys) the unscaled step grows to C·θ/(1 − η) times the loss curvature
        # and the memory diverges. The scaling bounds a chunk's total step by σ(·) < 1.
        theta = gate_theta * (1 - eta) / self.config.chunk_size
        y, _ = titans_memory(
            q, k, v, theta, eta, alpha, tuple(self.memory_weights),
            kind=self.config.memory_kind, chunk_size=self.config.chunk_size, impl=self.config.memory_impl,
        )
        return self.proj(self.out_norm(merge_heads(y)))


class TitansBlock(nn.Module):
    def __init__(self, config: ModelConfig, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Titans(LanguageModelBackbone):
    """Titans LMM: every ``attn_every``-th layer is sliding-window attention, the others memory.

    With the same preset as Transformer++ the parameter count matches within a few percent: a
    memory layer's q/k/v/out projections cost what attention's do, and the memory's own initial
    weights and gates are small.
    """

    is_abstract_base = False

    def build_block(self, index: int) -> nn.Module:
        c = self.config
        if (index + 1) % c.attn_every == 0:
            mixer = CausalSelfAttention(c.d_model, c.n_head, c.rope_base, window=c.attn_window)
        else:
            mixer = TitansMemoryLayer(c)
        return TitansBlock(c, mixer)
