"""Recall beyond the attention window: can the memory store an association and give it back?

    .venv/bin/python -m experiments.recall                 # the full study (docs/results.md, "Recall")
    .venv/bin/python -m experiments.recall --table         # print the table of docs/data/recall.csv

The study trains each model in its own one-thread process, ``--workers`` (2) at a time, longest
first, and merges their tables (``<logs>/parts/``); docs/results.md has how long it took. The
memory-only Titans ablation is not in the default set; run it alone with
``--models titans_memory_only --out docs/data/recall_probes/titans_memory_only.csv --plot
runs/recall/titans_memory_only.png``.

Every model trains on dense multi-query associative recall (Zoology's MQAR over bytes,
``data/longctx.py``): up to ``--train-pairs`` key–value pairs in random filler, every one queried
at the end, so a sequence carries many answers instead of one (with one answer per sequence a
window-16 delta-rule probe stayed at chance for 1,000 steps), and with a curriculum over length:
32, 64, 128 then 256 bytes, a quarter of the steps each, at the same tokens per step (a
memory-only Titans learned 16 answers per 32 bytes within 350 steps; at 128 bytes and 24 pairs it
was still at chance after 375). Then the test cells score
the tasks of the issue, each with its keys at least ``--min-distance`` bytes before the query
(default 4·window + 4: the receptive field of four stacked sliding windows and a convolution, the
most any of these models has), so attention cannot reach them and only a memory can answer:

* ``pairs1``: one key–value pair, one query;
* ``pairs4``: four pairs, one of them queried (MQAR);

at 1×, 4×, 16× the training length, and 64× for the linear-time models (full attention stops at
16×: its cost grows with the square of the length). ``--num-test`` sequences per cell at 1× and
4×, a quarter of that at 16× and a tenth at 64× (the Wilson 95% interval shows the difference).

Models, all from the ``tiny`` preset with the same training data, steps and optimizer:

* ``transformer``: full causal attention (sees every key at every length it was trained for);
* ``titans``: memory and sliding-window attention (window ``--window``) in alternate layers;
* ``titans_swa_only``: the same with the memory layers replaced by sliding-window attention;
* ``titans_memory_only``: memory layers only;
* ``hope``: HOPE's self-modifying memory and CMS;
* ``titans_noshift``, ``hope_noshift``: the same without ``key_shift`` (``ModelConfig``; the
  default starts the memories' keys from the previous token, the induction prior), the papers'
  convolution.

Writes ``--out`` (default docs/data/recall.csv: ``model,task,train_length,test_length,n,
exact_match,ci_low,ci_high``), the plot ``--plot`` (docs/img/recall.png) and, under ``--logs``,
each run's TensorBoard logs and trained weights (``<model>.pt``; ``--evaluate-only`` tests those
again without training). ``--table`` prints the markdown table of an existing CSV.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from scipy.stats import binomtest

from experiments.common import REPO_ROOT, add_output_arguments, key_values
from nl_lightning.data import RecallDataModule
from nl_lightning.data.longctx import make_mqar
from nl_lightning.models import Hope, Titans, TransformerPP
from nl_lightning.modules import RecallModel

MODELS = ("transformer", "titans", "titans_swa_only", "titans_memory_only", "hope", "titans_noshift", "hope_noshift",
          "titans_memory_only_noshift")
# The study's default: every model but the memory-only ablations (docs/data/recall_probes/ has one),
# so that two one-thread workers finish within 90 minutes on 2 cores.
DEFAULT_MODELS = tuple(m for m in MODELS if not m.startswith("titans_memory_only"))
# One-thread seconds to train and test each model at the default settings (the study's logs on 2
# cores, 2026-12-07; the memory-only ones from an earlier run without key_shift): the workers take
# the longest first, so the last one to finish is a short one.
SECONDS = {"hope_noshift": 2590, "hope": 2600, "titans_memory_only": 2340, "titans_memory_only_noshift": 2340,
           "titans_swa_only": 1300, "transformer": 1240, "titans": 920, "titans_noshift": 850}
TASKS = {"pairs1": 1, "pairs4": 4}  # name -> key–value pairs in the sequence (one queried)
COLUMNS = ("model", "task", "train_length", "test_length", "n", "exact_match", "ci_low", "ci_high")
# Test length as a multiple of the training length -> share of --num-test sequences.
MULTIPLES = {1: 1.0, 4: 1.0, 16: 0.25, 64: 0.1}
QUADRATIC = {"transformer"}  # full attention: tested up to 16×


def build_network(name: str, window: int, overrides: dict | None = None):
    """The model ``name`` at the tiny preset; Titans variants differ only in which layers attend,
    ``*_noshift`` models only in ``key_shift`` (off: their keys do not start from the previous token)."""
    overrides = dict(overrides or {})
    if name.endswith("_noshift"):
        name, overrides = name.removesuffix("_noshift"), {**overrides, "key_shift": False}
    if name == "transformer":
        return TransformerPP("tiny", overrides=overrides)
    if name == "hope":
        return Hope("tiny", overrides=overrides)
    layers = {"titans": 2, "titans_swa_only": 1, "titans_memory_only": 10**6}[name]  # attn_every
    return Titans("tiny", overrides={"attn_window": window, "attn_every": layers, **overrides})


@dataclass(frozen=True)
class Cell:
    model: str
    task: str
    train_length: int
    test_length: int
    n: int
    exact_match: float
    ci_low: float
    ci_high: float


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion."""
    interval = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


@torch.no_grad()
def score(network, task: str, length: int, n: int, min_distance: int, seed: int, batch_size: int) -> int:
    """How many of ``n`` generated ``task`` sequences of ``length`` the network answers exactly
    (argmax at the queried value's position)."""
    rng = np.random.default_rng([seed, 2, length, TASKS[task]])  # split id 2: test, as RecallDataset
    network.eval()
    correct = 0
    for start in range(0, n, batch_size):
        samples = [make_mqar(rng, length, TASKS[task], 1, min_distance) for _ in range(min(batch_size, n - start))]
        tokens = torch.from_numpy(np.stack([s.tokens for s in samples]).astype(np.int64))
        mask = torch.from_numpy(np.stack([s.answer_mask for s in samples]))[:, 1:]
        logits = network(tokens[:, :-1])
        correct += int((logits[mask].argmax(-1) == tokens[:, 1:][mask]).sum())
    return correct


def curriculum(train_length: int) -> list[int]:
    """Training lengths from 32 doubling up to ``train_length``, the last three stages at most and
    each a quarter of the steps (the last gets what is left)."""
    lengths = [train_length]
    while lengths[0] // 2 >= 32 and len(lengths) < 4:
        lengths.insert(0, lengths[0] // 2)
    return lengths


def train(name: str, args: argparse.Namespace):
    torch.manual_seed(args.seed)
    network = build_network(name, args.window, args.overrides)
    optimizer = partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    module = RecallModel(network, optimizer=optimizer, warmup_steps=min(30, args.steps), lr_schedule="cosine")
    data = RecallDataModule(
        task="mqar", train_length=args.train_length, eval_lengths=[args.train_length], num_pairs=args.train_pairs,
        batch_size=args.batch_size, num_val=args.batch_size, seed=args.seed,
        curriculum=curriculum(args.train_length), curriculum_steps=max(1, args.steps // 4),
    )
    # last.ckpt every 50 steps: a run that diverges keeps the weights from just before, to study.
    checkpoint = ModelCheckpoint(dirpath=args.logs / f"{name}_checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=50)
    trainer = Trainer(
        max_steps=args.steps, limit_val_batches=0, logger=TensorBoardLogger(args.logs, name=f"recall_{name}"),
        callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
        log_every_n_steps=10,
    )
    try:
        trainer.fit(module, datamodule=data)
    except FloatingPointError as error:  # recorded, not fatal: the other models still run
        print(f"{name}: training diverged ({error}); its cells are NaN", flush=True)
        return None
    return network


def run(args: argparse.Namespace) -> list[Cell]:
    cells = []
    for name in args.models:
        started = time.perf_counter()
        weights = args.logs / f"{name}.pt"
        if args.evaluate_only:
            network = build_network(name, args.window, args.overrides)
            network.load_state_dict(torch.load(weights, map_location="cpu"))
        else:
            network = train(name, args)
            if network is not None:
                weights.parent.mkdir(parents=True, exist_ok=True)
                torch.save(network.state_dict(), weights)
        trained = time.perf_counter()
        for task in TASKS:
            for multiple, share in MULTIPLES.items():
                if multiple > 16 and name in QUADRATIC:
                    continue
                length = multiple * args.train_length
                n = max(1, round(share * args.num_test))
                if network is None:
                    cells.append(Cell(name, task, args.train_length, length, n, *(float("nan"),) * 3))
                    continue
                correct = score(network, task, length, n, args.min_distance, args.seed, args.eval_batch_size)
                cells.append(Cell(name, task, args.train_length, length, n, correct / n, *wilson(correct, n)))
                print(f"{name} {task} @{length}: {correct}/{n}", flush=True)
        print(f"{name}: trained in {trained - started:.0f} s, tested in {time.perf_counter() - trained:.0f} s", flush=True)
        write_csv(cells, args.out)  # after every model: a stopped study keeps what it measured
    return cells


def run_side_by_side(args: argparse.Namespace) -> list[Cell]:
    """``run`` for each model in its own one-thread process, ``--workers`` at a time, longest first;
    each writes ``<logs>/parts/<model>.csv`` and ``.log``, merged here in ``--models`` order."""
    parts = args.logs.resolve() / "parts"  # absolute: the workers run from the repository root
    parts.mkdir(parents=True, exist_ok=True)
    queue = sorted(args.models, key=lambda name: -SECONDS[name])
    running: dict[str, subprocess.Popen] = {}
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while queue or running:
        while queue and len(running) < args.workers:
            name = queue.pop(0)
            command = [sys.executable, "-m", "experiments.recall", *_shared_arguments(args), "--models", name,
                       "--workers", "1", "--out", str(parts / f"{name}.csv"), "--plot", str(parts / f"{name}.png")]
            with (parts / f"{name}.log").open("w") as log:
                running[name] = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=log,
                                                 stderr=subprocess.STDOUT)
            print(f"{name}: started (log {parts / f'{name}.log'})", flush=True)
        time.sleep(1)
        for name, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0:
                for other in running.values():
                    other.kill()
                raise RuntimeError(f"recall study: {name} failed (exit {process.returncode}); "
                                   f"see {parts / f'{name}.log'}")
            done = [line for line in (parts / f"{name}.log").read_text().splitlines() if "trained in" in line]
            print(done[-1] if done else f"{name}: finished", flush=True)
    return [cell for name in args.models for cell in read_csv(parts / f"{name}.csv")]


def _shared_arguments(args: argparse.Namespace) -> list[str]:
    """The options every worker takes from this run (all but which models and where each writes)."""
    shared = ["--train-length", args.train_length, "--train-pairs", args.train_pairs, "--window", args.window,
              "--min-distance", args.min_distance, "--steps", args.steps, "--batch-size", args.batch_size,
              "--lr", args.lr, "--num-test", args.num_test, "--eval-batch-size", args.eval_batch_size,
              "--seed", args.seed, "--logs", args.logs.resolve()]
    if args.evaluate_only:
        shared.append("--evaluate-only")
    for item in args.override:
        shared += ["--override", item]
    return [str(value) for value in shared]


def write_csv(cells: list[Cell], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for c in cells:
            writer.writerow([c.model, c.task, c.train_length, c.test_length, c.n, f"{c.exact_match:.4f}",
                             f"{c.ci_low:.4f}", f"{c.ci_high:.4f}"])


def read_csv(path: Path) -> list[Cell]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise ValueError(f"{path} is not a recall table: expected the columns {','.join(COLUMNS)}")
    return [Cell(r["model"], r["task"], int(r["train_length"]), int(r["test_length"]), int(r["n"]),
                 float(r["exact_match"]), float(r["ci_low"]), float(r["ci_high"])) for r in rows]


def table(cells: list[Cell]) -> str:
    """Markdown: one row per (model, task), one column per test length, exact match [95% CI] (n);
    "not run" where the CSV has no cell (full attention beyond 16×)."""
    lengths = sorted({c.test_length for c in cells})
    lines = [f"| model | task | {' | '.join(f'@{n}' for n in lengths)} |", f"|---|---|{'---|' * len(lengths)}"]
    for model in dict.fromkeys(c.model for c in cells):
        for task in dict.fromkeys(c.task for c in cells):
            row = {c.test_length: c for c in cells if c.model == model and c.task == task}
            values = [("training diverged" if math.isnan(row[n].exact_match) else
                       f"{row[n].exact_match:.2f} [{row[n].ci_low:.2f}, {row[n].ci_high:.2f}] ({row[n].n})")
                      if n in row else "not run" for n in lengths]
            lines.append(f"| {model} | {task} | {' | '.join(values)} |")
    return "\n".join(lines)


def plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c.task for c in cells))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for model in dict.fromkeys(c.model for c in cells):
            points = sorted((c for c in cells if c.model == model and c.task == task), key=lambda c: c.test_length)
            x = [c.test_length for c in points]
            y = np.array([c.exact_match for c in points])
            err = np.array([[c.exact_match - c.ci_low for c in points], [c.ci_high - c.exact_match for c in points]])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=model)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{task} (keys beyond the window)")
        ax.set_xlabel("test length (bytes)")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("exact match (Wilson 95% CI)")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    parser.add_argument("--workers", type=int, default=2,
                        help="models run side by side, each in its own one-thread process (default: 2 cores)")
    parser.add_argument("--train-length", type=int, default=256)
    parser.add_argument("--train-pairs", type=int, default=16, help="key–value pairs per training sequence, all queried")
    parser.add_argument("--window", type=int, default=16, help="Titans' attention window")
    parser.add_argument("--min-distance", type=int, default=None,
                        help="bytes from every test key to its query (default 4·window + 4, beyond any attention)")
    parser.add_argument("--evaluate-only", action="store_true", help="test the weights saved under --logs")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-test", type=int, default=200, help="sequences per cell at 1× and 4×")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="ModelConfig field for every model, e.g. --override memory_kind=linear")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "docs" / "img" / "recall.png")
    add_output_arguments(parser, "recall", "e.g. two runs over different --models; --plot too")
    args = parser.parse_args(argv)
    for name in ("train_length", "train_pairs", "window", "steps", "batch_size", "num_test", "eval_batch_size",
                 "workers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.min_distance is None:
        args.min_distance = 4 * args.window + 4
    args.overrides = key_values(args.override, "--override", "memory_kind=linear")
    return args


def main(argv: list[str] | None = None) -> list[Cell]:
    args = parse_args(argv)
    if args.table:
        print(table(read_csv(args.out)))
        return read_csv(args.out)
    if args.merge:
        cells = [cell for path in args.merge for cell in read_csv(path)]
        write_csv(cells, args.out)
        plot(cells, args.plot)
        print(table(cells))
        return cells
    started = time.perf_counter()
    cells = run_side_by_side(args) if args.workers > 1 and len(args.models) > 1 else run(args)
    write_csv(cells, args.out)
    plot(cells, args.plot)
    print(table(cells))
    print(f"\nwrote {args.out} and {args.plot} in {time.perf_counter() - started:.0f} s")
    return cells


if __name__ == "__main__":
    main()
