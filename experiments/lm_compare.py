"""HOPE vs Titans vs Transformer++ (tiny) on the default byte corpus: same tokens, several seeds.

    .venv/bin/python -m experiments.lm_compare            # 120 steps × 3 seeds × 3 models, ≈ 23 min idle on 2 cores
    .venv/bin/python -m experiments.lm_compare --steps 30 --seeds 0   # a quick look

Each (model, seed) trains ``--steps`` optimizer steps as ``nl-lightning fit --config
recipes/lm/base.yaml --config recipes/lm/models/<model>.yaml`` would (the tiny preset; AdamW 3e-3,
30 warm-up steps then cosine, 16 × 256 bytes of the stdlib corpus, gradient clipping 1.0; so every
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
from functools import partial
from pathlib import Path

from experiments.common import REPO_ROOT

MODELS = ("hope", "titans", "transformer")


def child(model: str, steps: int, seed: int, val_batches: int, out: str) -> None:
    """One training run; prints one JSON line with the measurements."""
    # Imported here: the parent process only launches the runs and prints, and its memory stays small.
    import lightning
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from nl_lightning.data import ByteLMDataModule
    from nl_lightning.models import Hope, Titans, TransformerPP
    from nl_lightning.modules import LanguageModel

    lightning.seed_everything(seed, verbose=False)
    network = {"hope": Hope, "titans": Titans, "transformer": TransformerPP}[model]("tiny")
    module = LanguageModel(network, optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)),
                           warmup_steps=30, lr_schedule="cosine")
    data = ByteLMDataModule(seq_len=256, batch_size=16)
    trainer = Trainer(
        max_steps=steps, limit_train_batches=steps, limit_val_batches=0, gradient_clip_val=1.0, log_every_n_steps=10,
        logger=TensorBoardLogger(out, name=f"{model}_tiny"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - started
    trainer.limit_val_batches = val_batches
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    tokens = steps * data.batch_size * data.seq_len
    print(json.dumps({
        "bpb": metrics["val/bpb"], "tokens": tokens, "tokens_per_s": tokens / fit_s,
        "params": module.num_parameters(),
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
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "STEPS", "SEED", "VAL_BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, steps, seed, val_batches = args.child
        child(model, int(steps), int(seed), int(val_batches), args.out)
        return {}
    if args.steps <= 0 or args.val_batches <= 0:
        parser.error(f"--steps and --val-batches must be positive, got {args.steps} and {args.val_batches}")

    runs: dict[str, list[dict]] = {name: [] for name in args.models}
    for seed in args.seeds:  # seed-major: the models take turns, so load drift hits them alike
        for name in args.models:
            # From the repository root, where `-m experiments.lm_compare` imports and data/ is.
            command = [sys.executable, "-m", "experiments.lm_compare", "--out", str(Path(args.out).resolve()),
                       "--child", name, str(args.steps), str(seed), str(args.val_batches)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
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
