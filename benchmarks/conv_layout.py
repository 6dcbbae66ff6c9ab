"""Causal depthwise convolution of Titans/HOPE: channel-major Conv1d vs the channels-last form vs
the fused C++ kernel.

    .venv/bin/python -m benchmarks.conv_layout                  # D = 192 (HOPE-tiny) and 576 (Titans q|k|v)
    .venv/bin/python -m benchmarks.conv_layout --dims 576 --threads 2

All forms compute the same convolution (``tests/ops/test_conv.py``). ``conv1d`` is the
textbook one: transpose (B, T, D) to (B, D, T), ``nn.Conv1d``, transpose back, which leaves a
channel-major view. ``channels-last`` is ``CausalDepthwiseConv``'s ATen path: its output and
gradients stay in the (B, T, D) layout. ``fused`` is its C++ kernel (``ops/conv/conv_cpu.cpp``),
which does the normalisation too (what the models run on a CPU). Each is timed forward+backward
together with what follows it in the models (per-head L2 normalisation over a 48-wide head),
alternating call by call; the table gives medians and their ratios.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.timing import time_interleaved
from nl_lightning.models.layers import CausalDepthwiseConv


def conv1d_channel_major(conv: CausalDepthwiseConv, x: torch.Tensor) -> torch.Tensor:
    return conv.conv(F.pad(x.transpose(1, 2), (conv.kernel - 1, 0))).transpose(1, 2)


def normalize_heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    return F.normalize(y.unflatten(-1, (-1, head_dim)), dim=-1).flatten(-2)


# Each form: convolution, then per-head L2 normalisation over all channels.
FORMS = {
    "conv1d": lambda conv, x, head_dim: normalize_heads(conv1d_channel_major(conv, x), head_dim),
    "channels-last": lambda conv, x, head_dim: normalize_heads(conv(x), head_dim),
    "fused": lambda conv, x, head_dim: conv(x, normalized=x.shape[-1], group=head_dim, impl="cpu"),
}


def forward_backward(form, conv, x: torch.Tensor, head_dim: int) -> None:
    heads = form(conv, x, head_dim)
    heads.backward(torch.ones_like(heads))


def time_forms(batch: int, length: int, dim: int, head_dim: int, kernel: int, repeats: int) -> dict[str, float]:
    conv = CausalDepthwiseConv(dim, kernel)
    x = torch.randn(batch, length, dim, requires_grad=True)
    candidates = {name: partial(forward_backward, form, conv, x, head_dim) for name, form in FORMS.items()}
    timings = time_interleaved(candidates, repeats, warmup=1)
    return {name: timing.median for name, timing in timings.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--dims", type=int, nargs="+", default=[192, 576])
    parser.add_argument("--head-dim", type=int, default=48)
    parser.add_argument("--kernel", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"causal depthwise conv + per-head normalise, fwd+bwd, B={args.batch} T={args.length} "
        f"kernel={args.kernel}, threads={args.threads}, median of {args.repeats}"
    )
    print(f"{'D':>6}{'conv1d ms':>12}{'channels-last ms':>18}{'fused ms':>10}"
          f"{'conv1d/channels-last':>22}{'channels-last/fused':>21}")
    rows = []
    for dim in args.dims:
        med = time_forms(args.batch, args.length, dim, args.head_dim, args.kernel, args.repeats)
        ratio, fused_ratio = med["conv1d"] / med["channels-last"], med["channels-last"] / med["fused"]
        print(f"{dim:>6}{med['conv1d'] * 1e3:>12.1f}{med['channels-last'] * 1e3:>18.1f}{med['fused'] * 1e3:>10.1f}"
              f"{ratio:>21.2f}x{fused_ratio:>20.2f}x")
        rows.append({"dim": dim, **med, "ratio": ratio, "fused_ratio": fused_ratio})
    return rows


if __name__ == "__main__":
    main()
