"""The causal depthwise convolution through ATen on any device (the contract's ``chunk`` slot: the
convolution has no chunks, this is its PyTorch implementation).

It runs as a (1 × K) 2-d convolution on a channels-last view, whose memory layout *is* (B, T, C):
no transposed copy on the way in, and the output (and its gradient) stays contiguous in (B, T, C).
A Conv1d on ``x.transpose(1, 2)`` returns a channel-major view instead, and every consumer pays for
it: per-head normalisation over a strided last dim, and the convolution's backward on a transposed
gradient (together ≈ 2.5× slower fwd+bwd at B=4, T=1024, C=576 on CPU; ``python -m benchmarks.conv_layout``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nl_lightning.ops.conv.naive import normalize_groups


def chunk_causal_conv(x: torch.Tensor, weight: torch.Tensor, *, normalized: int = 0, group: int = 1) -> torch.Tensor:
    """Same contract as ``naive_causal_conv``."""
    padded = F.pad(x, (0, 0, weight.shape[-1] - 1, 0))  # (B, T + K - 1, C)
    channels_last = padded.unsqueeze(1).permute(0, 3, 1, 2)  # (B, C, 1, T'), strides of (B, T', C)
    y = F.conv2d(channels_last, weight.unsqueeze(2), groups=weight.shape[0])
    return normalize_groups(y.permute(0, 2, 3, 1).squeeze(1), normalized, group)
