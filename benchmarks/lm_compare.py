"""HOPE vs Titans vs Transformer++ (tiny) on the default byte corpus: same tokens, several seeds.

    .venv/bin/python benchmarks/lm_compare.py            # 120 steps × 3 seeds × 3 models, ≈ 23 min idle on 2 cores
    .venv/bin/python benchmarks/lm_compare.py --steps 30 --seeds 0   # a quick look

Each (model, seed) trains ``--steps`` optimizer steps of ``recipes/lm/<model>_tiny.yaml`` (so every
model sees the same batch size × sequence length × steps tokens) in its own subprocess, then
validates on ``--val-batches`` held-out batches. Reported per model, mean ± std over seeds:
validation bits per byte, training tokens/s (fit wall time, including its warm-up steps) and peak
resident memory of the subprocess (``resource.getrusage`` max RSS). Runs are interleaved
(seed-major) so machine-load drift spreads over the models; compare ratios, not absolute values.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("hope", "titans", "transformer")


def child(recipe: str, steps: int, seed: int, val_batches: int, out: str) -> None:
    """One training run; prints one JSON line with the measurements."""
    from nl_lightning.cli import build_cli

    cli = build_cli([
        "--config", recipe, f"--seed_everything={seed}", f"--trainer.max_steps={steps}",
        f"--trainer.limit_train_batches={steps}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--checkpoint.save_last=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={out}",
    ], run=False)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - started
    cli.trainer.limit_val_batches = val_batches
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    data = cli.datamodule
    tokens = steps * data.batch_size * data.seq_len
    print(json.dumps({
        "bpb": metrics["val/bpb"], "tokens": tokens, "tokens_per_s": tokens / fit_s,
        "params": cli.model.num_parameters(),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }))


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120,
                        help="training steps per run (same for every model); 120 = the recipes' warm-up + cosine schedule")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--out", default="runs/lm_compare")
    parser.add_argument("--child", nargs=4, metavar=("RECIPE", "STEPS", "SEED", "VAL_BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        recipe, steps, seed, val_batches = args.child
        child(recipe, int(steps), int(seed), int(val_batches), args.out)
        return {}
    if args.steps <= 0 or args.val_batches <= 0:
        parser.error(f"--steps and --val-batches must be positive, got {args.steps} and {args.val_batches}")

    runs: dict[str, list[dict]] = {name: [] for name in args.models}
    for seed in args.seeds:  # seed-major: the models take turns, so load drift hits them alike
        for name in args.models:
            recipe = REPO_ROOT / "recipes" / "lm" / f"{name}_tiny.yaml"
            command = [sys.executable, __file__, "--out", args.out,
                       "--child", str(recipe), str(args.steps), str(seed), str(args.val_batches)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path.cwd())
            if done.returncode != 0:
                raise RuntimeError(f"{name} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name} seed {seed}: {result}", flush=True)
            runs[name].append(result)

    print(f"\n{args.steps} steps per run, seeds {args.seeds}; mean ± std over seeds\n")
    print("| model | params | tokens | val bits/byte | tokens/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, results in runs.items():
        print(f"| {name} | {results[0]['params']:,} | {results[0]['tokens']:,} "
              f"| {mean_std([r['bpb'] for r in results], '.3f')} "
              f"| {mean_std([r['tokens_per_s'] for r in results], '.0f')} "
              f"| {mean_std([r['max_rss_mib'] for r in results], '.0f')} |")
    return runs


if __name__ == "__main__":
    main()
