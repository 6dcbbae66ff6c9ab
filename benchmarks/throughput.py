"""Training throughput of recipes, side by side in one run.

    .venv/bin/python benchmarks/throughput.py recipes/lm/transformer_tiny.yaml [more recipes] --steps 20

For each recipe: build its model and data exactly as the CLI would, train ``--steps`` optimizer
steps (after ``--warmup`` untimed ones), and report tokens/s, the FLOPs of one step (counted by
``torch.utils.flop_counter``, forward + backward), and MFU = achieved FLOP/s divided by this
machine's matmul peak measured in the same run. Ratios between rows are the meaningful numbers;
absolute values depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from nl_lightning.cli import NLLightningCLI


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


def build(recipe: Path, overrides: list[str]):
    cli = NLLightningCLI(
        args=["--config", str(recipe), *overrides],
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
    )
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def train_step(module, optimizer, inputs, targets) -> None:
    loss = F.cross_entropy(module(inputs).flatten(0, 1).float(), targets.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(recipe: Path, steps: int, warmup: int, overrides: list[str]) -> dict:
    module, data = build(recipe, overrides)
    module.train()
    optimizer = module.optimizer_factory(module._param_groups())
    batches = iter(data.train_dataloader())
    inputs, targets = next(batches)
    with FlopCounterMode(display=False) as counter:
        train_step(module, optimizer, inputs, targets)
    flops_per_step = counter.get_total_flops()
    for _ in range(warmup):
        train_step(module, optimizer, *next(batches))
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        inputs, targets = next(batches)
        train_step(module, optimizer, inputs, targets)
        tokens += targets.numel()
    elapsed = time.perf_counter() - start
    return {
        "recipe": str(recipe),
        "params": module.num_parameters(),
        "tokens_per_s": tokens / elapsed,
        "flops_per_s": flops_per_step * steps / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", type=Path, default=[Path("recipes/lm/transformer_tiny.yaml")])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--override", action="append", default=[], help="CLI override applied to every recipe")
    args = parser.parse_args()

    torch.manual_seed(0)
    peak = matmul_peak_flops()
    rows = [measure(recipe, args.steps, args.warmup, args.override) for recipe in args.recipes]
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
