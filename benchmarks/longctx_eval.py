"""Long-context recall: train (or load) each model on one task, then accuracy vs context length.

Default evaluation (one task × 3 models, 60 training steps of 16×256 bytes each, 8 test samples
at each of 1K/2K/4K/8K/16K, batch 1, CPU):

    .venv/bin/python benchmarks/longctx_eval.py --task passkey

Budget: from the quiet-machine training throughput in benchmarks/RESULTS.md (HOPE 2.6K, Titans
7.1K, Transformer++ 9.4K tokens/s at 16×256) training is ≈ 96 + 35 + 26 s; testing is 8 × 31K
bytes per model. Not measured end to end on a quiet machine: on the shared 2-core machine
(load average 15–18) HOPE alone needed > 24 min for its 60 steps. Smaller: ``--steps 5 --num-test 1``.

For every model in ``--models`` it builds ``recipes/longctx/<model>_<task>_tiny.yaml`` exactly as
``nl-lightning fit`` would, trains ``--steps`` optimizer steps (same for every model) or loads
``--ckpt <model>=<path>``, then tests at every ``--lengths`` value (``--num-test`` samples each,
batch 1). Writes, under ``<out>/<task>/``:

- ``accuracy_vs_length.csv`` (model, task, length, accuracy, token_accuracy, num_samples, seconds, status),
- ``accuracy_vs_length.png``,
- TensorBoard events: each model's run (``<out>/<task>/longctx_<recipe>/``) has its training curves and
  ``test/accuracy@<length>``; ``<out>/<task>/summary/`` has ``longctx/<task>/<model>/accuracy`` with
  the length as the step, and the plot as an image.

Lengths whose sliding-window attention scores would need more than ``--memory-budget-gb`` (blocked
attention is linear in T: Titans-tiny at 16K needs ~0.1 GiB) are skipped with a message. Longer settings, GPU:

    .venv/bin/python benchmarks/longctx_eval.py --task mqar --steps 2000 --num-test 64 \\
        --lengths 1024 4096 16384 32768 65536 --memory-budget-gb 40 --override=--trainer.accelerator=gpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from nl_lightning.cli import build_cli
from nl_lightning.evaluation import evaluate_by_length, log_to_tensorboard, plot_accuracy_vs_length, write_csv

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("hope", "titans", "transformer")
TASKS = ("passkey", "niah", "mqar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="passkey")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=60, help="training steps per model (same for all)")
    parser.add_argument("--num-test", type=int, default=8, help="test samples per length")
    parser.add_argument("--ckpt", nargs="*", default=[], metavar="MODEL=PATH",
                        help="evaluate these checkpoints instead of training (e.g. hope=runs/.../last.ckpt)")
    parser.add_argument("--memory-budget-gb", type=float, default=2.0)
    parser.add_argument("--recipes", type=Path, default=REPO_ROOT / "recipes" / "longctx")
    parser.add_argument("--out", type=Path, default=Path("runs") / "longctx_eval")
    parser.add_argument("--override", action="append", default=[],
                        help="extra CLI argument for every recipe, e.g. --override=--data.init_args.num_pairs=4")
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
    return args


def run_model(name: str, args: argparse.Namespace, out_dir: Path):
    recipe = args.recipes / f"{name}_{args.task}_tiny.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"no recipe {recipe}; --models must name recipes/longctx/<model>_{args.task}_tiny.yaml")
    cli = build_cli([
        "--config", str(recipe),
        f"--trainer.max_steps={args.steps}", f"--trainer.logger.init_args.save_dir={out_dir}",
        "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=null",
        f"--trainer.limit_train_batches={args.steps}", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", f"--data.init_args.num_test={args.num_test}",
        *args.override,
    ], run=False)
    started = time.perf_counter()
    if name in args.checkpoints:
        state = torch.load(args.checkpoints[name], map_location="cpu", weights_only=False)["state_dict"]
        cli.model.load_state_dict(state)
        print(f"{name}: loaded {args.checkpoints[name]}")
    else:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_s = time.perf_counter() - started
    results = evaluate_by_length(cli.trainer, cli.model, cli.datamodule, args.lengths, name, args.memory_budget_gb)
    return results, train_s, time.perf_counter() - started - train_s


def main(argv: list[str] | None = None) -> list:
    args = parse_args(argv)
    out_dir = args.out / args.task
    results, timings, started = [], {}, time.perf_counter()
    for name in args.models:
        model_results, train_s, eval_s = run_model(name, args, out_dir)
        results += model_results
        timings[name] = (train_s, eval_s)
    csv_path = write_csv(results, out_dir / "accuracy_vs_length.csv")
    figure = plot_accuracy_vs_length(results)
    png_path = out_dir / "accuracy_vs_length.png"
    figure.savefig(png_path, dpi=120)
    with SummaryWriter(str(out_dir / "summary")) as writer:
        log_to_tensorboard(writer, results, figure)

    print(f"\n| model | {' | '.join(str(n) for n in sorted(args.lengths))} | train s | eval s |")
    print(f"|---|{'---|' * len(args.lengths)}---|---|")
    for name in args.models:
        cells = [f"{r.accuracy:.2f}" if r.status == "ok" else "skip" for r in results if r.model == name]
        print(f"| {name} | {' | '.join(cells)} | {timings[name][0]:.0f} | {timings[name][1]:.0f} |")
    print(f"\naccuracy = exact match of the whole answer ({args.task}, {args.num_test} samples per length, "
          f"{args.steps} training steps); total {time.perf_counter() - started:.0f}s")
    print(f"wrote {csv_path}, {png_path}, TensorBoard: {out_dir}")
    return results


if __name__ == "__main__":
    main()
