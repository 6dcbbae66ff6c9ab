"""Training throughput of recipes, side by side in one run.

    .venv/bin/python benchmarks/throughput.py recipes/lm/transformer_tiny.yaml [more recipes] --steps 20

For each recipe: build its model and data exactly as the CLI would, train ``--steps`` optimizer
steps (after ``--warmup`` untimed ones; the recipes take turns step by step), and report tokens/s,
the FLOPs of one step (counted by ``torch.utils.flop_counter``, forward + backward), and MFU =
achieved FLOP/s divided by this machine's matmul peak measured in the same run. Ratios between
rows are the meaningful numbers; absolute values depend on the machine and its load.
``benchmarks/kernel_bound.py`` splits a step's time into its heavy kernels and the rest.

Two corrections to torch's FLOP counter (``FLOP_FORMULAS``, passed as its ``custom_mapping``):
it has formulas for the CUDA attention kernels but not for the CPU one
(``_scaled_dot_product_flash_attention_for_cpu``), which it counted as 0 — on CPU that hid
Transformer++'s whole attention cost; and its convolution backward ignores ``groups``, which
counted the depthwise causal convolutions of Titans and HOPE as dense ones (22 of Titans-tiny's
76 GFLOP at B=4, T=1024, against a real cost of a few MFLOP). Attention is counted like torch's
GPU formulas, the full T×T score matrix even when causal (the kernel skips about half of it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from nl_lightning.cli import build_cli


def matmul_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """Best FLOP/s of a float32 square matmul: the denominator of MFU on this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _convolution_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding,
    _groups, output_mask, out_shape=None,
) -> int:
    """Each requested gradient (input, weight) costs one forward convolution. The forward count
    reads the weight's (out, in / groups, ...) shape, so a grouped convolution counts its real work."""
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


aten = torch.ops.aten
FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flop,
    aten.convolution_backward: _convolution_backward_flop,
}


def count_flops() -> FlopCounterMode:
    """torch's FLOP counter with the corrections above."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


def build(recipe: Path, overrides: list[str]):
    cli = build_cli(["--config", str(recipe), *overrides], run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def train_step(module, optimizer, inputs, targets) -> None:
    loss = F.cross_entropy(module(inputs).flatten(0, 1).float(), targets.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Run:
    """One recipe's model, optimizer and batches, stepped one optimizer step at a time."""

    def __init__(self, recipe: Path, overrides: list[str]) -> None:
        self.recipe = recipe
        self.module, data = build(recipe, overrides)
        self.module.train()
        self.optimizer = self.module.optimizer_factory(self.module._param_groups())
        self.batches = iter(data.train_dataloader())
        with count_flops() as counter:
            self.step()
        self.flops_per_step = counter.get_total_flops()
        self.seconds, self.tokens, self.steps = 0.0, 0, 0

    def step(self) -> int:
        inputs, targets = next(self.batches)
        train_step(self.module, self.optimizer, inputs, targets)
        return targets.numel()

    def timed_step(self) -> None:
        start = time.perf_counter()
        tokens = self.step()
        self.seconds += time.perf_counter() - start
        self.tokens += tokens
        self.steps += 1


def train_interleaved(runs: list[Run], warmup: int, steps: int) -> None:
    """``warmup`` untimed then ``steps`` timed steps of every run, the recipes taking turns step by
    step so that load on the machine hits all of them alike."""
    for _ in range(warmup):
        for run in runs:
            run.step()
    for _ in range(steps):
        for run in runs:
            run.timed_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", type=Path, default=[Path("recipes/lm/transformer_tiny.yaml")])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--override", action="append", default=[], help="CLI override applied to every recipe")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). On cores shared with other jobs use 1: with "
        "more, OpenMP waits on descheduled threads and small kernels slow down by orders of magnitude",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    peak = matmul_peak_flops()
    runs = [Run(recipe, args.override) for recipe in args.recipes]
    train_interleaved(runs, args.warmup, args.steps)
    rows = [
        {
            "recipe": str(run.recipe),
            "params": run.module.num_parameters(),
            "tokens_per_s": run.tokens / run.seconds,
            "flops_per_s": run.flops_per_step * run.steps / run.seconds,
        }
        for run in runs
    ]
    baseline = rows[0]["tokens_per_s"]
    print(f"\nmatmul peak on this machine: {peak / 1e9:.1f} GFLOP/s (float32, {torch.get_num_threads()} threads)\n")
    print(f"| recipe | params | tokens/s | vs first | MFU |\n| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['recipe']} | {row['params'] / 1e6:.2f}M | {row['tokens_per_s']:,.0f} | "
            f"{row['tokens_per_s'] / baseline:.2f}x | {row['flops_per_s'] / peak:.1%} |"
        )


if __name__ == "__main__":
    main()
