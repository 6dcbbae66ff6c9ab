"""Building blocks shared by the model families: RMSNorm, RoPE, SwiGLU, causal attention (and
the estimate of its memory), head split/merge, gates, the memories' causal convolution and the
residual MLP memory's initial weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nl_lightning.ops.conv import causal_conv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 activations do not lose the mean square.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_cos_sin(
    seq_len: int, head_dim: int, base: float, device: torch.device, dtype: torch.dtype, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim) for positions offset..offset+seq_len-1."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of the last dim by position-dependent angles (rotate-half form).

    x: (..., T, head_dim); cos/sin: (T, head_dim). Dot products of rotated queries and keys then
    depend only on the distance between their positions.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE through ``scaled_dot_product_attention``.

    ``window`` limits each query to the last ``window`` keys (sliding-window attention, used by
    Titans); ``None`` is full causal attention. Sequences longer than two windows go through
    ``blocked_sliding_window_attention`` (memory linear in T); shorter ones through a dense mask.
    """

    def __init__(self, dim: int, n_head: int, rope_base: float, window: int | None = None) -> None:
        super().__init__()
        if window is not None and window <= 0:
            raise ValueError(f"attention window must be positive or None, got {window}")
        self.n_head = n_head
        self.rope_base = rope_base
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_head, dim // self.n_head).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        cos, sin = rope_cos_sin(seq_len, q.shape[-1], self.rope_base, x.device, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.window is None or self.window >= seq_len:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif seq_len > 2 * self.window:
            out = blocked_sliding_window_attention(q, k, v, self.window)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(seq_len, self.window, x.device))
        return self.proj(out.transpose(1, 2).reshape(batch, seq_len, dim))


def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask: query i sees keys j with i - window < j <= i.

    With it, ``scaled_dot_product_attention`` is the dense reference of sliding-window attention
    (T² scores); ``blocked_sliding_window_attention`` computes the same with 2·window scores per query.
    """
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def blocked_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window causal attention in blocks of ``window`` queries: (B, H, T, d) → (B, H, T, d).

    A query in block b can only see keys in blocks b − 1 and b, so each block attends to a
    2·window slice of keys under a fixed (window, 2·window) mask: B·H·T·2·window scores instead of
    the dense mask's B·H·T², which at 16K tokens is the difference between megabytes and gigabytes.
    T is zero-padded to a multiple of the window; padded keys sit either before position 0 (masked)
    or after every real query (causally invisible), and padded queries are dropped.
    """
    batch, heads, seq_len, dim = q.shape
    blocks = -(-seq_len // window)
    pad = blocks * window - seq_len

    def to_blocks(t: torch.Tensor, front: int) -> torch.Tensor:
        return F.pad(t, (0, 0, front, pad)).unflatten(2, (-1, window))  # (B, H, blocks (+1), window, d)

    q_blocks = to_blocks(q, 0)
    k_padded, v_padded = to_blocks(k, window), to_blocks(v, window)  # one block of zeros in front
    k_pairs = torch.cat([k_padded[:, :, :-1], k_padded[:, :, 1:]], dim=3)  # (B, H, blocks, 2·window, d)
    v_pairs = torch.cat([v_padded[:, :, :-1], v_padded[:, :, 1:]], dim=3)
    # Query i of a block sees pair slots j with i < j ≤ i + window (slot window + i is itself).
    i = torch.arange(window, device=q.device)[:, None]
    j = torch.arange(2 * window, device=q.device)[None, :]
    mask = ((j > i) & (j <= i + window)).expand(blocks, window, 2 * window).clone()
    # Block 0's left neighbour is padding before position 0. fill_, not ``= False``: assigning a
    # Python value copies it from host memory, which a CUDA graph cannot record.
    mask[0, :, :window].fill_(False)
    out = F.scaled_dot_product_attention(
        q_blocks.flatten(1, 2), k_pairs.flatten(1, 2), v_pairs.flatten(1, 2),
        attn_mask=mask.repeat(heads, 1, 1),
    )  # (B, H·blocks, window, d): heads and blocks share the batch-like dimension
    return out.unflatten(1, (heads, blocks)).flatten(2, 3)[:, :, :seq_len]


# -- the memory attention needs at a length ------------------------------------------------------
# The attention scores are the length-dependent memory worth estimating: sliding-window attention
# (Titans) materialises its scores — dense (T, T) up to two windows, then 2·window per query
# (``blocked_sliding_window_attention``, linear in T). Full causal attention (Transformer++,
# ``is_causal=True``) uses the fused kernels on CPU and GPU, whose memory is linear in T, so it
# counts zero.


def attention_score_bytes(network: nn.Module, length: int, batch_size: int) -> int:
    """Peak bytes of the score tensors that sliding-window attention materialises at ``length``.

    Counted per layer as float32 scores and their softmax plus the boolean mask, following
    ``CausalSelfAttention``'s paths: dense (B, H, T, T) scores when window < T ≤ 2·window, blocked
    (B, H, T', 2·window) scores above (T' = T rounded up to a multiple of the window). Layers run
    one after another, so the peak is one layer's worth. Full causal attention or a window ≥ T
    counts zero (fused kernel).
    """
    per_layer = []
    for module in network.modules():
        if not isinstance(module, CausalSelfAttention) or module.window is None or module.window >= length:
            continue
        window = module.window
        if length > 2 * window:
            padded = -(-length // window) * window
            per_layer.append(batch_size * module.n_head * padded * 2 * window * 4 * 2 + padded * 2 * window)
        else:
            per_layer.append(batch_size * module.n_head * length * length * 4 * 2 + length * length)
    return max(per_layer, default=0)


def attention_memory_excess(network: nn.Module, length: int, batch_size: int, memory_budget_gb: float) -> str | None:
    """Why ``length`` does not fit ``memory_budget_gb`` of attention scores, or ``None`` when it does.

    The message names the length, the estimated bytes and the budget; callers add their own fix.
    """
    if memory_budget_gb <= 0:
        raise ValueError(f"memory_budget_gb must be positive, got {memory_budget_gb}")
    needed = attention_score_bytes(network, length, batch_size)
    if needed <= memory_budget_gb * 2**30:
        return None
    return (f"sliding-window attention at {length} needs ~{needed / 2**30:.2f} GiB of scores "
            f"({needed:,} bytes at batch {batch_size}) > memory budget {memory_budget_gb} GiB")


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, H·Dh) → (B, H, T, Dh), a view."""
    batch, seq_len, dim = x.shape
    return x.view(batch, seq_len, n_head, dim // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, Dh) → (B, T, H·Dh)."""
    batch, n_head, seq_len, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq_len, n_head * head_dim)


def gate_bias(target: float) -> float:
    """Bias that makes sigmoid start at ``target``."""
    return math.log(target / (1 - target))


class CausalDepthwiseConv(nn.Module):
    """Per-channel causal convolution over time (``nl_lightning.ops.conv``): output t sees inputs
    t-kernel+1 .. t only. It starts as the identity, except the channels ``shifted = (start, end)``,
    which start as the previous token (output t = input t-1)."""

    def __init__(self, dim: int, kernel: int, shifted: tuple[int, int] | None = None) -> None:
        super().__init__()
        if shifted is not None and (kernel < 2 or not 0 <= shifted[0] < shifted[1] <= dim):
            raise ValueError(
                f"shifted={shifted} needs a kernel of at least 2 taps (got {kernel}) and a channel range within [0, {dim}]"
            )
        self.kernel, self.shifted = kernel, shifted
        # Holds the (dim, 1, kernel) weight under the usual name (checkpoints, init, optimiser
        # groups); ``forward`` applies it through the op rather than calling the Conv1d.
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        # Start as the identity (weight 1 on the current token) so the conv only learns a mix.
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, -1] = 1.0
            if self.shifted is not None:
                start, end = self.shifted
                self.conv.weight[start:end, 0, -1] = 0.0
                self.conv.weight[start:end, 0, -2] = 1.0

    def forward(self, x: torch.Tensor, *, normalized: int = 0, group: int = 1, impl: str = "chunk") -> torch.Tensor:
        """x: (B, T, D) → (B, T, D); then ``F.normalize`` over each group of ``group`` channels among
        the first ``normalized`` (Titans' per-head queries and keys). ``impl``: the op's (the
        models pass their ``memory_impl``)."""
        return causal_conv(x, self.conv.weight, normalized=normalized, group=group, impl=impl)


def without_first_key(keys: torch.Tensor) -> torch.Tensor:
    """Keys (B, H, T, d) with token 0's set to zero, for memories whose keys start from the previous
    token (``ModelConfig.key_shift``): token 0 has no previous token, so it writes nothing.

    At initialisation that key is already zero (the shifted convolution reads the zero padding);
    setting it explicitly is for the backward pass. Through a zero key the gradient is 1/ε twice
    over, once from the L2 normalisation of a zero vector and once from the delta rule's step
    β/(‖k‖² + ε); it reached 10¹³ on the key convolution at initialisation and, clipped, scaled every
    other gradient of the first step to nothing. A constant zero passes no gradient back.
    """
    return torch.cat([torch.zeros_like(keys[:, :, :1]), keys[:, :, 1:]], dim=2)


def residual_mlp_weights(heads: int, dim: int, hidden: int) -> nn.ParameterList:
    """Initial state (W1, W2) of the residual MLP memory ``M(z) = z + W1 silu(W2 z)``
    (``nl_lightning.ops.memory_read``).

    W1 starts small (the MLP part is ~10% of |z|): the curvature of the inner loss w.r.t. W2
    grows with |W1|², and a large W1 makes the paper rule's steps overshoot (``ModelConfig.dgd_max_step``).
    """
    return nn.ParameterList(
        [
            nn.Parameter(0.1 * torch.randn(heads, dim, hidden) / math.sqrt(hidden)),
            nn.Parameter(torch.randn(heads, hidden, dim) / math.sqrt(dim)),
        ]
    )
