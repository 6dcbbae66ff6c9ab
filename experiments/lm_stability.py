"""Does language modelling stay stable and as good with the delta write rule as with the paper's?

    .venv/bin/python -m experiments.lm_stability            # writes docs/data/lm_stability.csv
    .venv/bin/python -m experiments.lm_stability --table    # the tables of that CSV

On 2 cores, one one-thread process per model, then merge:
    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.lm_stability --models hope --out runs/lm_hope.csv &
    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.lm_stability --models titans --out runs/lm_titans.csv; wait
    .venv/bin/python -m experiments.lm_stability --merge runs/lm_hope.csv runs/lm_titans.csv

HOPE-tiny and Titans-tiny as ``recipes/lm/base.yaml`` + ``models/<model>.yaml`` train them (AdamW 3e-3, 30 warm-up
steps then cosine, 16 × 256 bytes of the stdlib corpus, gradient clipping 1.0), per seed:

* the recipes' 120-step protocol (the one behind docs/results.md's LM table) for each of
  ``--variants`` on the same seed, so same batches: ``delta`` (``write_rule="delta"`` without
  ``key_shift``), ``paper`` (``write_rule="paper"``, the papers' rules and convolution) and
  ``delta_shift`` (the delta rule with ``key_shift``: the defaults); the summary pairs delta with
  paper and delta_shift with delta, per seed, at step 120;
* 600 steps (validation every 120 steps) with ``--long-variant`` (default ``delta_shift``, the
  defaults): whether it stays finite.

``--variants delta_shift --long-steps 0`` adds key_shift's runs to a study that has the others
(``--merge`` the CSVs).

A run whose loss turns non-finite stops (``LanguageModel`` raises) and is recorded as diverged.
The summary reports per-seed paired differences with a bootstrap 95% interval over seeds.
"""

from __future__ import annotations

import argparse
import csv
from functools import partial
from pathlib import Path

import lightning
import numpy as np
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from experiments.common import REPO_ROOT, add_output_arguments, paired_interval
from nl_lightning.data import ByteLMDataModule
from nl_lightning.models import Hope, Titans
from nl_lightning.modules import LanguageModel

FAMILIES = {"hope": Hope, "titans": Titans}
# The memory settings a run trains with: the write rules, and the delta rule with key_shift (the
# defaults). Every variant states key_shift so that its runs do not change with the default.
VARIANTS = {"delta": {"write_rule": "delta", "key_shift": False},
            "paper": {"write_rule": "paper", "key_shift": False},
            "delta_shift": {"write_rule": "delta", "key_shift": True}}
# (variant, baseline) pairs the summary compares seed by seed.
PAIRS = (("delta", "paper"), ("delta_shift", "delta"))
COLUMNS = ("model", "variant", "seed", "steps", "step", "val_bpb", "diverged")


class ValidationRecorder(Callback):
    """(optimizer step, val/bpb) after every validation."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val/bpb"])))


def run(model: str, variant: str, seed: int, steps: int, val_every: int, args) -> list[dict]:
    lightning.seed_everything(seed, verbose=False)
    network = FAMILIES[model]("tiny", overrides=VARIANTS[variant])
    module = LanguageModel(network, optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)),
                           warmup_steps=30, lr_schedule="cosine")
    data = ByteLMDataModule(paths=args.paths, seq_len=256, batch_size=16, data_dir=str(args.data_dir))
    recorder = ValidationRecorder()
    trainer = Trainer(
        max_steps=steps, val_check_interval=val_every, limit_val_batches=args.val_batches, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[recorder], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
        logger=TensorBoardLogger(args.logs, name=f"{model}_{variant}_{steps}_seed{seed}"),
    )
    diverged = False
    try:
        trainer.fit(module, datamodule=data)
    except FloatingPointError:
        diverged = True
    rows = [dict(model=model, variant=variant, seed=seed, steps=steps, step=step, val_bpb=bpb, diverged=diverged)
            for step, bpb in recorder.points]
    if diverged or not rows:
        rows.append(dict(model=model, variant=variant, seed=seed, steps=steps, step=trainer.global_step,
                         val_bpb=float("nan"), diverged=diverged))
    print(f"{model} {variant} seed {seed} {steps} steps: "
          + ", ".join(f"{r['step']}: {r['val_bpb']:.3f}" for r in rows) + (" DIVERGED" if diverged else ""), flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """Per (model, variant vs baseline): step-120 validation bits/byte per seed, the paired
    differences and their bootstrap interval; then every longer run's curve."""
    lines = ["| model | variant | step-120 val bits/byte | baseline | variant − baseline per seed | mean [95% CI] |",
             "|---|---|---|---|---|---|"]
    short = [r for r in rows if int(r["steps"]) == 120 and int(r["step"]) == 120]
    for model in dict.fromkeys(r["model"] for r in short):
        by = {(r["variant"], int(r["seed"])): float(r["val_bpb"]) for r in short if r["model"] == model}
        for variant, baseline in PAIRS:
            seeds = sorted({s for (_, s) in by if (variant, s) in by and (baseline, s) in by})
            if not seeds:
                continue
            diffs = [by[variant, s] - by[baseline, s] for s in seeds]
            low, high = paired_interval(diffs)
            ours = " / ".join(f"{by[variant, s]:.3f}" for s in seeds)
            theirs = " / ".join(f"{by[baseline, s]:.3f}" for s in seeds)
            lines.append(f"| {model} | {variant} vs {baseline} | {ours} | {theirs} | "
                         f"{' / '.join(f'{d:+.3f}' for d in diffs)} | {np.mean(diffs):+.3f} [{low:+.3f}, {high:+.3f}] |")
    lines += ["", "| model | seed | steps | val bits/byte at 120 / 240 / 360 / 480 / 600 | diverged |", "|---|---|---|---|---|"]
    long = [r for r in rows if int(r["steps"]) > 120]
    for key in dict.fromkeys((r["model"], r["variant"], int(r["seed"]), int(r["steps"])) for r in long):
        points = [r for r in long if (r["model"], r["variant"], int(r["seed"]), int(r["steps"])) == key]
        bpbs = " / ".join(f"{float(r['val_bpb']):.3f}" for r in points)
        diverged = any(str(r["diverged"]) in ("True", "true", "1") for r in points)
        lines.append(f"| {key[0]} ({key[1]}) | {key[2]} | {key[3]} | {bpbs} | {'**yes**' if diverged else 'no'} |")
    return "\n".join(lines)


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "val_bpb": f"{r['val_bpb']:.4f}"} for r in rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--short-steps", type=int, default=120, help="the paired 120-step protocol; 0 skips it")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["delta", "paper", "delta_shift"],
                        help="what the short protocol trains, each on the same batches per seed")
    parser.add_argument("--long-steps", type=int, default=600, help="the stability run; 0 skips it")
    parser.add_argument("--long-variant", choices=list(VARIANTS), default="delta_shift",
                        help="what the stability run trains (delta_shift: the defaults)")
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--paths", nargs="+", default=None, help="text files or folders (default: the stdlib corpus)")
    add_output_arguments(parser, "lm_stability", "runs split over processes")
    args = parser.parse_args(argv)
    if args.table or args.merge:
        rows = []
        for path in args.merge or [args.out]:
            with path.open() as f:
                rows += list(csv.DictReader(f))
        if args.merge:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
        print(summary(rows))
        return rows
    rows = []
    for seed in args.seeds:  # seed-major, so machine-load drift spreads over the runs
        for model in args.models:
            for variant in args.variants if args.short_steps else ():
                rows += run(model, variant, seed, args.short_steps, max(1, args.short_steps // 3), args)
                write_rows(rows, args.out)  # after every run: a stopped study keeps what it measured
            if args.long_steps:
                rows += run(model, args.long_variant, seed, args.long_steps, max(1, args.long_steps // 5), args)
                write_rows(rows, args.out)
    print(summary([{k: str(v) for k, v in r.items()} for r in rows]))
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
