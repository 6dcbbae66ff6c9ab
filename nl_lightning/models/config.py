"""One config dataclass for every model size, with named presets (litgpt style)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nl_lightning.ops import IMPLS, KINDS, RENAMED_IMPLS


@dataclass(frozen=True)
class ModelConfig:
    """Sizes shared by every model family. Families read the fields they need.

    ``stated_params`` is the size a preset promises (at the byte-level vocabulary); tests hold
    every preset to within 10% of it.
    """

    vocab_size: int = 256
    d_model: int = 192
    n_layer: int = 4
    n_head: int = 4
    mlp_multiple_of: int = 64
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    # Untied by default: at a 256-byte vocabulary the head costs little, and a tied head starts
    # out predicting "next byte = this byte" (initial loss ≈ ln V + 1 instead of ln V).
    tie_embeddings: bool = False
    stated_params: int | None = None
    # -- neural memory (Titans, HOPE) --
    memory_kind: str = "mlp"  # "linear" or "mlp" (residual 2-layer MLP, M(z) = z + W1 σ(W2 z))
    chunk_size: int = 64  # tokens whose memory gradients share one chunk-start state
    # The implementation every memory op of the model runs (nl_lightning/ops/contract.py): "auto"
    # (the C++ kernels on CPU where they apply, "chunk" elsewhere), "chunk", "naive", "compiled",
    # "cpu" (CPU; HOPE's MLP memories, Titans' both kinds), "triton" (GPU, or the Triton
    # interpreter; Titans' linear memory, the MLP memories under either write rule, HOPE's
    # projection memories' writes; chunks and hidden sizes up to 64).
    memory_impl: str = "auto"
    conv_kernel: int = 4  # short causal depthwise convolution on q, k, v
    # The memories' keys start from the previous token (their convolution starts as a one-token shift,
    # learnable like the rest): token t writes "what follows x_{t-1}", the induction prior with which a
    # query x_s reads back what followed x_s before. Without it the memories of the recall study learned
    # to return the last value they stored, not the queried key's (docs/results.md, "Recall"): four
    # pairs, one queried, went from 0.27 to 1.00 for Titans. It is the default because it also lowered
    # step-120 validation bits/byte in every seed (Titans −0.12, HOPE −0.10, "Language modelling with
    # the delta rule"); false is the papers' convolution, which old results used.
    key_shift: bool = True
    # How the memories write (SPEC §2, "Write stability"): "delta" (default) is the layer-local
    # normalised delta rule of ops/dgd/naive.py, with step gate β = σ(·) ∈ (0, 1] and no step cap:
    # its state bound holds on any input and β = 1 stores an association in one token. "paper" is
    # each paper's own rule with the step caps old results used: Titans' momentum rule with
    # θ = σ·(1 − η)/C, HOPE's DGD with η = dgd_max_step·σ/C (and its self-made target).
    write_rule: str = "delta"
    # Target of the delta rule: "value" (v) or "self" (the memory's own v̂ = M(v), HOPE's).
    memory_target: str = "value"
    # -- Titans --
    attn_window: int = 64  # sliding-window attention span in Titans' attention layers
    attn_every: int = 2  # every attn_every-th layer is sliding-window attention, the rest memory
    # -- HOPE --
    proj_chunk_size: int = 64  # chunk size of the self-modifying projection memories (k, v, η, α)
    # write_rule="paper" only: largest DGD step the tokens of one chunk add up to,
    # η_t = dgd_max_step · σ(·) / chunk size. 0.5 keeps language modelling stable; it also makes one
    # token's write tiny (≤ 0.008 at C=64), too small for one-shot recall. docs/results.md: 16 or 32
    # let HOPE-tiny learn one-pair recall but its language modelling diverged (NaN) within 120 steps
    # at 8, 16 and 32; 4 was stable.
    dgd_max_step: float = 0.5
    # write_rule="paper" only: the same cap for the self-modifying projection memories (k, v, η, α);
    # None = dgd_max_step. (Under "delta" they write with the delta rule too, uncapped.)
    proj_dgd_max_step: float | None = None
    # The projection memories restart from their slow (trained) weights every proj_reset_every
    # tokens (a multiple of proj_chunk_size); None = never, the paper's HOPE. At or above the
    # training length it changes nothing in training and bounds how far the fast projections can
    # drift at test time: a HOPE with key_shift trained at 256 bytes recalled 5/50 one-pair keys at
    # 4,096 bytes as it is and 50/50 with resets every 256 (docs/results.md, "Recall").
    proj_reset_every: int | None = None
    cms_periods: tuple[int, ...] = (1, 4, 16)  # training-step period of each CMS level (NestedScheduler)
    cms_hidden: int | None = None  # SwiGLU width of a CMS level; None matches Transformer++'s parameter count
    cms_in_context: bool = False  # in-context fast weights: level ℓ also updates every cms_context_periods[ℓ] tokens
    cms_context_periods: tuple[int, ...] = (1, 16, 256, 4096)
    cms_context_lr: float = 0.1

    def __post_init__(self) -> None:
        # YAML/JSON give lists; keep the frozen config hashable.
        object.__setattr__(self, "cms_periods", tuple(self.cms_periods))
        object.__setattr__(self, "cms_context_periods", tuple(self.cms_context_periods))
        positive = ("vocab_size", "d_model", "n_layer", "n_head", "mlp_multiple_of", "chunk_size",
                    "conv_kernel", "attn_window", "attn_every", "proj_chunk_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "choose n_head that divides d_model"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got d_model/n_head = {self.head_dim}")
        for name in ("dgd_max_step", "proj_dgd_max_step"):
            value = getattr(self, name)
            if name == "proj_dgd_max_step" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        reset = self.proj_reset_every
        if reset is not None and (isinstance(reset, bool) or not isinstance(reset, int) or reset <= 0
                                  or reset % self.proj_chunk_size):
            raise ValueError(
                f"ModelConfig.proj_reset_every must be None or a positive multiple of proj_chunk_size="
                f"{self.proj_chunk_size}, got {reset!r}"
            )
        if self.write_rule not in ("delta", "paper"):
            raise ValueError(f"write_rule must be 'delta' or 'paper', got {self.write_rule!r}")
        if self.memory_target not in ("value", "self"):
            raise ValueError(f"memory_target must be 'value' or 'self', got {self.memory_target!r}")
        if not isinstance(self.key_shift, bool):
            raise ValueError(f"ModelConfig.key_shift must be true or false, got {self.key_shift!r}")
        if self.key_shift and self.conv_kernel < 2:
            raise ValueError(f"key_shift needs conv_kernel >= 2 to reach the previous token, got {self.conv_kernel}")
        if self.memory_kind not in KINDS:
            raise ValueError(f"memory_kind must be one of {list(KINDS)}, got {self.memory_kind!r}")
        if self.memory_impl in RENAMED_IMPLS:
            raise ValueError(
                f"memory_impl={self.memory_impl!r} is now called {RENAMED_IMPLS[self.memory_impl]!r}; rename it in your config"
            )
        if self.memory_impl not in IMPLS:
            raise ValueError(f"memory_impl must be one of {list(IMPLS)}, got {self.memory_impl!r}")
        if not self.cms_periods or any(not isinstance(p, int) or p <= 0 for p in self.cms_periods):
            raise ValueError(f"cms_periods must be positive integers, one per CMS level, got {self.cms_periods!r}")
        if any(not isinstance(p, int) or p <= 0 for p in self.cms_context_periods):
            raise ValueError(f"cms_context_periods must be positive integers, got {self.cms_context_periods!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width: 8/3·d (keeps 3 matrices at the cost of a 4·d GELU MLP), rounded up."""
        hidden = (8 * self.d_model) // 3
        return self.mlp_multiple_of * -(-hidden // self.mlp_multiple_of)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields are {sorted(fields)}")
        return cls(**{**PRESETS[name], **overrides})


# Sizes at the byte-level vocabulary (256). `tiny` trains on 2 CPU cores in minutes; `760m` and
# `1.3b` are for GPUs (tests only build them on the meta device).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=192, n_layer=4, n_head=4, stated_params=1_800_000),
    "small": dict(d_model=512, n_layer=12, n_head=8, stated_params=38_000_000),
    "760m": dict(d_model=1536, n_layer=27, n_head=12, stated_params=760_000_000),
    "1.3b": dict(d_model=2048, n_layer=26, n_head=16, stated_params=1_300_000_000),
}
