"""HOPE: self-modifying Titans memory followed by a Continuum Memory System (SPEC §2).

Self-referential memory: the projections are adaptive memories,
``k_t = M_k(x_t), v_t = M_v(x_t), η_t = M_η(x_t), α_t = M_α(x_t)``, ``q_t = x_t W_q`` fixed. Each
memory is a residual MLP ``M(z) = z + W1 σ(W2 z)`` whose initial state is a slow (trained)
parameter; during a sequence each memory makes its own target and writes with ``config.write_rule``
(``nl_lightning.ops.dgd``):

* ``"delta"`` (default): the normalised delta rule, step gate β ∈ (0, 1) with no cap. The main
  memory's target is ``config.memory_target``; each projection memory's is its *slow* map of the
  value, ``v̂_□ = M_□,slow(v_t)`` (its trained initial weights), which keeps "its own target"
  while making the target independent of the fast state: the paper's ``M_□,t−1(v_t)`` feeds the
  state back into its own target and diverged in training (the projection memories of a HOPE
  trained on recall at up to 128 bytes reached NaN in their second chunk update at 256 bytes;
  ``experiments/write_stability.py`` measures the same feedback on random streams).
* ``"paper"``: the DGD rule with ``v̂ = M_t−1(v_t)`` and the step caps ``dgd_max_step / C``.

Chunk-parallel form: within a chunk of ``proj_chunk_size`` tokens the projections are read from the memories' chunk-start state, so one chunk's k, v, η, α
are computed in parallel and only the chunk loop is sequential. The main memory (per head, chunk
``chunk_size``) is read before its own update: ``o_t = M_{memory,t−1}(q_t)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nl_lightning.models.backbone import LanguageModelBackbone
from nl_lightning.models.cms import ContinuumMemory
from nl_lightning.models.config import ModelConfig
from nl_lightning.models.layers import (
    CausalDepthwiseConv,
    RMSNorm,
    gate_bias,
    merge_heads,
    residual_mlp_weights,
    split_heads,
    without_first_key,
)
from nl_lightning.ops import memory_read
from nl_lightning.ops.dgd import dgd_memory
from nl_lightning.ops.projection import projection_memories

PROJECTIONS = ("k", "v", "eta", "alpha")  # the projection memories, in the op's order


class SelfModifyingMemory(nn.Module):
    """HOPE's token mixer."""

    INITIAL_GATES = {"eta": 0.5, "alpha": 0.99}  # DGD step gate and retention at the start

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h, hd = config.d_model, config.n_head, config.head_dim
        self.config = config
        self.conv = CausalDepthwiseConv(d, config.conv_kernel)
        # The keys are M_k's read-outs; under key_shift a convolution over them starts as the previous
        # token's (ModelConfig.key_shift), so token t writes what follows x_{t-1}.
        self.key_conv = CausalDepthwiseConv(d, config.conv_kernel, shifted=(0, d)) if config.key_shift else None
        self.q_proj = nn.Linear(d, d, bias=False)
        # The four projection memories share keys, values and gates, so they are stacked as the
        # "heads" of one memory and updated by a single kernel call per chunk.
        self.projections = residual_mlp_weights(len(PROJECTIONS), d, max(8, d // 4))
        # Gate biases: per main-memory head, plus one for the projection memories' own updates.
        self.gate_bias = nn.ParameterDict(
            {name: nn.Parameter(torch.full((h + 1,), gate_bias(v))) for name, v in self.INITIAL_GATES.items()}
        )
        if config.memory_kind == "linear":
            self.memory = nn.ParameterList([nn.Parameter(torch.eye(hd).repeat(h, 1, 1))])
        else:
            self.memory = residual_mlp_weights(h, hd, hd)
        self.out_norm = RMSNorm(d, config.norm_eps)
        self.proj = nn.Linear(d, d, bias=False)

    def _gate(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """Gate ``name`` of the main memory from raw (B, T, d), one per head (B, H, T). The projection
        memories' own gates are built inside their op (``ops.projection.projection_gates``) from
        ``projection_gate_bias()`` and ``_eta_scale(heads=False)``.

        Under the DGD rule η is divided by the chunk size of the memory it drives. Within a chunk
        every token's gradient is taken at the chunk-start state, so on repetitive text
        (near-identical keys) C tokens add up to one step of C·η on a stale error: without the 1/C
        the chunked update overshoots and diverges (seen as NaN after ~100 training steps on the
        stdlib corpus). ``config.dgd_max_step`` (default 0.5; ``proj_dgd_max_step`` for the
        projection memories) keeps that chunk step below the stability limit of the residual-MLP
        memories' inner loss at their initial scale. The delta rule needs neither, for the main
        memory or the projection memories: its gate is the step β itself (``ops/dgd/naive.py``).
        """
        h, bias = self.config.n_head, self.gate_bias[name]
        gate = torch.sigmoid(raw.unflatten(-1, (h, -1)).mean(-1).transpose(1, 2) + bias[:h, None])
        return self._eta_scale(heads=True) * gate if name == "eta" else gate

    def projection_gate_bias(self) -> torch.Tensor:
        """(2,): the biases of the projection memories' η and α (the last entry of each gate bias)."""
        h = self.config.n_head
        return torch.stack([self.gate_bias["eta"][h], self.gate_bias["alpha"][h]])

    def _eta_scale(self, heads: bool) -> float:
        """η = this · σ(·): under the DGD rule the step cap over the chunk size, of the main memory
        (``heads``) or of the projection memories; 1 under the delta rule (β = σ(·))."""
        config = self.config
        if config.write_rule == "delta":
            return 1.0
        if heads:
            return config.dgd_max_step / config.chunk_size
        max_step = config.dgd_max_step if config.proj_dgd_max_step is None else config.proj_dgd_max_step
        return max_step / config.proj_chunk_size

    def project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the self-modifying projection memories over the sequence: k, v, η, α for every token
        (``nl_lightning.ops.projection``), from their slow weights again every
        ``config.proj_reset_every`` tokens."""
        c = self.config
        segments = x.split(c.proj_reset_every, dim=1) if c.proj_reset_every else (x,)
        outs = [
            projection_memories(
                segment, tuple(self.projections), self.projection_gate_bias(), chunk_size=c.proj_chunk_size,
                eta_scale=self._eta_scale(heads=False), rule=self._write_rule()["rule"], impl=c.memory_impl,
            )
            for segment in segments
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # one segment: no copy
        return dict(zip(PROJECTIONS, out.unbind(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.config.n_head
        x = self.conv(x, impl=self.config.memory_impl)
        # The memories see unit-norm inputs, so their keys, targets and errors are O(1) whatever
        # the residual stream's scale.
        p = self.project(F.normalize(x, dim=-1))
        q = F.normalize(split_heads(self.q_proj(x), h), dim=-1)
        keys = p["k"] if self.key_conv is None else self.key_conv(p["k"], impl=self.config.memory_impl)
        k = F.normalize(split_heads(keys, h), dim=-1)
        if self.key_conv is not None:
            k = without_first_key(k)
        v = split_heads(p["v"], h)
        eta, alpha = self._gate("eta", p["eta"]), self._gate("alpha", p["alpha"])
        # o_t = M_{t-1}(q_t): read token t+1's query after token t's update, and the first
        # token's query from the initial state.
        next_q = torch.cat([q[:, :, 1:], torch.zeros_like(q[:, :, :1])], dim=2)
        read_after, _ = dgd_memory(
            next_q, k, v, eta, alpha, tuple(self.memory), kind=self.config.memory_kind,
            chunk_size=self.config.chunk_size, impl=self.config.memory_impl, **self._write_rule(),
        )
        first = self._initial_readout(q[:, :, :1])
        out = torch.cat([first, read_after[:, :, :-1]], dim=2)
        return self.proj(self.out_norm(merge_heads(out)))

    def _write_rule(self) -> dict[str, str]:
        """The main memory's rule and target for ``dgd_memory``: "paper" is DGD with v̂ = M(v)."""
        if self.config.write_rule == "delta":
            return {"rule": "delta", "target": self.config.memory_target}
        return {"rule": "dgd", "target": "self"}

    def _initial_readout(self, q: torch.Tensor) -> torch.Tensor:
        return memory_read(self.config.memory_kind, tuple(w.unsqueeze(0) for w in self.memory), q)


class HopeBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = SelfModifyingMemory(config)
        self.cms = ContinuumMemory(
            config.d_model, cms_hidden(config, self.mixer), config.cms_periods, config.norm_eps,
            context_periods=config.cms_context_periods if config.cms_in_context else None,
            context_lr=config.cms_context_lr,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cms(x + self.mixer(self.mixer_norm(x)))


def cms_hidden(config: ModelConfig, mixer: nn.Module) -> int:
    """CMS width that gives a HOPE block the parameter count of a Transformer++ block."""
    if config.cms_hidden is not None:
        return config.cms_hidden
    d = config.d_model
    transformer_block = 4 * d * d + 3 * d * config.mlp_hidden + 2 * d
    budget = transformer_block - sum(p.numel() for p in mixer.parameters()) - d
    per_level = budget / len(config.cms_periods) - d  # each level has its own norm
    return max(8, 8 * round(per_level / (3 * d) / 8))


class Hope(LanguageModelBackbone):
    """HOPE language model. ``param_groups()`` hands CMS levels to the optimizer with their ``period``."""

    is_abstract_base = False

    def build_block(self, index: int) -> nn.Module:
        return HopeBlock(self.config)

    def param_groups(self) -> list[dict]:
        """One group per CMS level (all blocks), with ``period`` and ``level``; the rest is level 0."""
        levels: dict[int, list[nn.Parameter]] = {i: [] for i in range(len(self.config.cms_periods))}
        in_cms: set[int] = set()
        for block in self.blocks:
            for i, level in enumerate(block.cms.levels):
                levels[i].extend(level.parameters())
                in_cms.update(id(p) for p in level.parameters())
        rest = [p for p in self.parameters() if id(p) not in in_cms]
        groups = [{"params": rest, "name": "backbone", "period": 1, "level": 0}]
        for i, period in enumerate(self.config.cms_periods):
            groups.append({"params": levels[i], "name": f"cms.{i}", "period": period, "level": i})
        return groups
