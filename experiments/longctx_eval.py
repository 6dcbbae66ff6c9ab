"""Long-context recall: train (or load) each model on one task, then accuracy vs context length.

Default evaluation (3 models, each 300 training steps of 32×64 bytes on single-pair associative
recall, then 16 test samples at the training length 64 and at 1K/2K/4K/8K/16K, batch 1, CPU):

    .venv/bin/python -m experiments.longctx_eval

The default task is MQAR with one key–value pair (``recipes/longctx/tasks/mqar.yaml``): a random
value byte follows its key at a uniform depth in random filler; the answer is that value (chance
1/64), so it can only come from the context. It is the setting found to be learned within the CPU
budget. One run of this default with 8 test samples per length (load 1–2, 596 s end to end),
exact match at 64 / 1K / 2K / 4K / 8K / 16K bytes:

    Transformer++  0.75 / 0.25 / 0.62 / 0 / 0.12 / 0
    Titans         0.75 / 0    / 0    / 0 / 0    / 0
    HOPE           0    / 0    / 0    / 0 / 0    / 0     (its answer loss stayed at chance)

Transformer++ did not learn within the same budget with 24×128-byte batches (answer loss still at
chance, ln 64, after 210 steps) nor with two pairs, 32×64 (50% per byte, 0% exact: a stored value,
not the queried key's; ``--data num_pairs=2``). The old default, the 5-digit
passkey after 60 steps of 16×256, was 0% everywhere. Testing at the training length first shows
what was learned; the longer lengths show how far it extrapolates.

Budget (idle 2-core machine): 300 × 32 × 64 = 614,400 training tokens per model; at the idle
training throughput in docs/results.md (HOPE 1.6K, Titans 4.0K, Transformer++ 6.1K tokens/s, at
16×256) that is ≈ 377 + 154 + 100 = 631 s; measured at 32×64 in that run: 231 + 122 + 84
= 437 s. Testing reads 16 × (64 + 1K + 2K + 4K + 8K + 16K) = 510K bytes per model, forward only,
dominated by 16K (Transformer++'s attention is quadratic); measured for 8 samples: 74 + 23 + 53 =
150 s, so ≈ 300 s for 16. Total ≈ 596 + 150 s ≈ 12.5 min (the 8-sample run above took 596 s).
On a loaded machine try ``OMP_NUM_THREADS=1``: on the shared 2-core machine (load 7–10) a step took
~5× longer with torch's default two threads than with one (not a controlled comparison). Smaller:
``--steps 5 --num-test 1``.

For every model in ``--models`` it builds what ``nl-lightning fit --config recipes/longctx/base.yaml
--config tasks/<task>.yaml --config models/<model>.yaml`` trains (``TASK_DATA``, ``TASK_LR``: those
recipes' settings; ``--data KEY=VALUE`` changes a ``RecallDataModule`` argument, ``--override
KEY=VALUE`` a ``ModelConfig`` field), trains ``--steps`` optimizer steps (same for every model) or
loads ``--ckpt <model>=<path>``, then tests at every ``--lengths`` value (``--num-test`` samples
each, batch 1). Writes, under ``<out>/<task>/``:

- ``accuracy_vs_length.csv`` (model, task, length, accuracy, token_accuracy, num_samples, seconds, status),
- ``accuracy_vs_length.png``,
- TensorBoard events and the last checkpoint: each model's run (``<out>/<task>/<model>/``) has its training curves and
  ``test/accuracy@<length>``; ``<out>/<task>/summary/`` has ``longctx/<task>/<model>/accuracy`` with
  the length as the step, and the plot as an image.

Lengths whose sliding-window attention scores would need more than ``--memory-budget-gb`` (blocked
attention is linear in T: Titans-tiny at 16K needs ~0.1 GiB) are skipped with a message. Longer settings, GPU:

    .venv/bin/python -m experiments.longctx_eval --task mqar --steps 2000 --num-test 64 \\
        --lengths 512 4096 16384 32768 65536 --memory-budget-gb 40 --accelerator gpu \\
        --data num_pairs=8 --data train_length=512
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import lightning
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from experiments.common import key_values
from nl_lightning.data import RecallDataModule
from nl_lightning.evaluation import evaluate_by_length, log_to_tensorboard, plot_accuracy_vs_length, write_csv
from nl_lightning.models import Hope, Titans, TransformerPP
from nl_lightning.modules import RecallModel

NETWORKS = {"hope": Hope, "titans": Titans, "transformer": TransformerPP}
MODELS = tuple(NETWORKS)
TASKS = ("passkey", "niah", "mqar")
DEFAULT_STEPS = 300  # the recipes' max_steps; the budget arithmetic above
EXTRAPOLATION_LENGTHS = (1024, 2048, 4096, 8192, 16384)
# The settings of recipes/longctx/base.yaml with tasks/<task>.yaml over it, which `nl-lightning fit`
# trains with (tests/experiments/test_longctx_eval.py checks that the two agree).
BASE_DATA = dict(train_length=256, batch_size=16, eval_lengths=[256, *EXTRAPOLATION_LENGTHS], num_val=64, num_test=16,
                 eval_batch_size=1)
TASK_DATA = {
    "passkey": dict(task="passkey"),
    "niah": dict(task="niah"),
    "mqar": dict(task="mqar", train_length=64, batch_size=32, num_pairs=1, eval_lengths=[64, *EXTRAPOLATION_LENGTHS]),
}
TASK_LR = {"passkey": 2e-3, "niah": 2e-3, "mqar": 3e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="mqar")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help=f"test lengths (default: training length, then {list(EXTRAPOLATION_LENGTHS)})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per model (same for all)")
    parser.add_argument("--num-test", type=int, default=16, help="test samples per length")
    parser.add_argument("--ckpt", nargs="*", default=[], metavar="MODEL=PATH",
                        help="evaluate these checkpoints instead of training (e.g. hope=runs/.../last.ckpt)")
    parser.add_argument("--memory-budget-gb", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("runs") / "longctx_eval")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="a RecallDataModule argument for every model, over the task's, e.g. --data num_pairs=4")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a ModelConfig field for every model, e.g. --override attn_window=16")
    parser.add_argument("--accelerator", default="auto", help="the Trainer's accelerator (cpu, gpu, auto)")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.num_test <= 0:
        parser.error(f"--steps and --num-test must be positive, got {args.steps} and {args.num_test}")
    checkpoints = {}
    for item in args.ckpt:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS or not Path(path).is_file():
            parser.error(f"--ckpt {item!r}: expected MODEL=PATH with MODEL in {list(MODELS)} and an existing file")
        checkpoints[name] = Path(path)
    args.checkpoints = checkpoints
    args.data = key_values(args.data, "--data", "num_pairs=4")
    args.override = key_values(args.override, "--override", "attn_window=16")
    return args


def lengths_to_evaluate(requested: list[int] | None, train_length: int) -> list[int]:
    """``--lengths`` as given, or the training length followed by 1K..16K: in-distribution accuracy
    next to the extrapolation, so a model that learned the task but does not extrapolate shows it."""
    return sorted(set(requested)) if requested else sorted({train_length, *EXTRAPOLATION_LENGTHS})


def build(name: str, args: argparse.Namespace, out_dir: Path) -> tuple[Trainer, RecallModel, RecallDataModule]:
    """Model ``name`` on ``args.task`` as the recipes build it (seed 0, AdamW, 30 warm-up steps then
    cosine, gradient clipping 1.0), training ``args.steps`` steps and logging to ``out_dir/<name>``."""
    lightning.seed_everything(0, verbose=False)
    network = NETWORKS[name]("tiny", overrides=args.override)
    optimizer = partial(torch.optim.AdamW, lr=TASK_LR[args.task], weight_decay=0.1, betas=(0.9, 0.95))
    module = RecallModel(network, optimizer=optimizer, warmup_steps=30, lr_schedule="cosine")
    data = RecallDataModule(**{**BASE_DATA, **TASK_DATA[args.task], "num_test": args.num_test, **args.data})
    trainer = Trainer(
        max_steps=args.steps, limit_train_batches=args.steps, limit_val_batches=2, val_check_interval=None,
        check_val_every_n_epoch=None, gradient_clip_val=1.0, log_every_n_steps=10, accelerator=args.accelerator,
        logger=TensorBoardLogger(out_dir, name=name), callbacks=[ModelCheckpoint(save_last=True)],
        enable_progress_bar=False,
    )
    return trainer, module, data


def run_model(name: str, args: argparse.Namespace, out_dir: Path):
    trainer, module, data = build(name, args, out_dir)
    started = time.perf_counter()
    if name in args.checkpoints:
        state = torch.load(args.checkpoints[name], map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        print(f"{name}: loaded {args.checkpoints[name]}")
    else:
        trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - started
    lengths = lengths_to_evaluate(args.lengths, data.train_length)
    results = evaluate_by_length(trainer, module, data, lengths, name, args.memory_budget_gb)
    return results, train_s, time.perf_counter() - started - train_s, data.train_length


def main(argv: list[str] | None = None) -> list:
    args = parse_args(argv)
    out_dir = args.out / args.task
    results, timings, started = [], {}, time.perf_counter()
    for name in args.models:
        model_results, train_s, eval_s, train_length = run_model(name, args, out_dir)
        results += model_results
        timings[name] = (train_s, eval_s)
    csv_path = write_csv(results, out_dir / "accuracy_vs_length.csv")
    figure = plot_accuracy_vs_length(results, train_length)
    png_path = out_dir / "accuracy_vs_length.png"
    figure.savefig(png_path, dpi=120)
    with SummaryWriter(str(out_dir / "summary")) as writer:
        log_to_tensorboard(writer, results, figure)

    lengths = sorted({r.length for r in results})
    print(f"\n| model | {' | '.join(str(n) for n in lengths)} | train s | eval s |")
    print(f"|---|{'---|' * len(lengths)}---|---|")
    for name in args.models:
        cells = [f"{r.accuracy:.2f}" if r.status == "ok" else "skip" for r in results if r.model == name]
        print(f"| {name} | {' | '.join(cells)} | {timings[name][0]:.0f} | {timings[name][1]:.0f} |")
    print(f"\naccuracy = exact match of the whole answer ({args.task}, {args.num_test} samples per length, "
          f"{args.steps} training steps); total {time.perf_counter() - started:.0f}s")
    print(f"wrote {csv_path}, {png_path}, TensorBoard: {out_dir}")
    return results


if __name__ == "__main__":
    main()
