"""Step-time overhead of the NestedScheduler callback, with and without it side by side in one run.

    .venv/bin/python -m benchmarks.scheduler_overhead                       # HOPE-tiny, CMS levels 1 and 2
    .venv/bin/python -m benchmarks.scheduler_overhead --model transformer --repeats 6

The same tiny LM run (``LanguageModel`` + HOPE-tiny or Transformer++-tiny, AdamW, random bytes,
a TensorBoard logger) is trained twice at once, without and with ``NestedScheduler``, in two
Trainers that take turns one optimizer step at a time (two threads passing a baton, so only one
computes at any moment and both see the same background load); ``--repeats`` fresh pairs, the
first arm alternating. The first ``--warmup`` steps of every run are not timed. A step is timed
from ``on_train_batch_start`` to the end of ``on_train_batch_end``, so it includes the callback's
hooks and its logging.

Printed: the median step time of each arm and their ratio (the goal is ≤ 1.02), and the time
spent inside the callback's hooks as a fraction of the step with it: the same overhead measured
directly, free of the run-to-run noise that dominates the ratio on a busy CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from functools import partial

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning.callbacks import NestedScheduler
from nl_lightning.models import Hope, TransformerPP
from nl_lightning.modules import LanguageModel

MODELS = {"hope": Hope, "transformer": TransformerPP}
# Slow levels on parameters of the model's MLPs: HOPE's CMS levels 1 and 2 (its own periods 4 and
# 16); for Transformer++, the MLPs of the upper half of the blocks.
LEVELS = {
    "hope": {"network.blocks.*.cms.levels.1.*": 4, "network.blocks.*.cms.levels.2.*": 16},
    "transformer": {"network.blocks.2.mlp.*": 4, "network.blocks.3.mlp.*": 16},
}


class Baton:
    """Two training runs take turns, one step each; a finished run no longer holds the other up."""

    def __init__(self, first: int) -> None:
        self._turn, self._finished, self._condition = first, set(), threading.Condition()

    def wait_for_turn(self, arm: int) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._turn == arm or (1 - arm) in self._finished)

    def pass_on(self, arm: int, finished: bool = False) -> None:
        with self._condition:
            if finished:
                self._finished.add(arm)
            self._turn = 1 - arm
            self._condition.notify_all()


class StepTimer(Callback):
    """Times every training batch after the warm-up, taking turns through the baton (put it last).

    Hooks, not ``benchmarks.timing``: the step runs inside ``Trainer.fit``, and only the hooks see
    where it starts and ends (and the callback's own hooks must fall inside the timed span)."""

    def __init__(self, arm: int, baton: Baton, warmup: int) -> None:
        self.arm, self.baton, self.warmup = arm, baton, warmup
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.baton.wait_for_turn(self.arm)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
        self.baton.pass_on(self.arm)

    def on_train_end(self, trainer, pl_module):
        self.baton.pass_on(self.arm, finished=True)


class TimedNestedScheduler(NestedScheduler):
    """NestedScheduler that adds up the time spent in its per-step hooks (timed inside them: the
    Trainer calls them, so ``benchmarks.timing`` cannot wrap the calls)."""

    def __init__(self, *args, warmup: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.warmup, self.seconds = warmup, 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if trainer.global_step >= self.warmup:  # the step being taken, counted from 0 like batch_idx
            self.seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx >= self.warmup:
            self.seconds += time.perf_counter() - start


def build(args, with_scheduler: bool, timer: StepTimer, log_dir: str) -> tuple[Trainer, LanguageModel, DataLoader]:
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch_size * (args.steps + 1), args.seq_len + 1))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=args.batch_size)
    model = LanguageModel(
        MODELS[args.model]("tiny"), optimizer=partial(torch.optim.AdamW, lr=1e-3), warmup_steps=0, lr_schedule="constant"
    )
    callbacks = [timer]
    if with_scheduler:
        callbacks.insert(0, TimedNestedScheduler(LEVELS[args.model], log_every_n_steps=args.log_every, warmup=args.warmup))
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, callbacks=callbacks,
        logger=TensorBoardLogger(log_dir, name="with" if with_scheduler else "without"),
        log_every_n_steps=args.log_every, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    return trainer, model, data


def run_pair(args, first: int, log_dir: str) -> tuple[list[float], list[float], float]:
    """Both arms side by side; returns the timed step times without and with, and the seconds in the hooks."""
    baton = Baton(first)
    timers = [StepTimer(arm, baton, args.warmup) for arm in (0, 1)]
    runs = [build(args, bool(arm), timers[arm], log_dir) for arm in (0, 1)]
    errors: list[BaseException] = []

    def fit(arm: int) -> None:
        trainer, model, data = runs[arm]
        try:
            trainer.fit(model, train_dataloaders=data)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
            baton.pass_on(arm, finished=True)

    threads = [threading.Thread(target=fit, args=(arm,)) for arm in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    scheduler = runs[1][0].callbacks[0]
    return timers[0].times, timers[1].times, scheduler.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="hope")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=4, help="pairs of runs (fresh models each)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=4, help="logging interval of both arms (steps)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    times: dict[bool, list[float]] = {False: [], True: []}
    ratios, hook_seconds = [], 0.0
    with tempfile.TemporaryDirectory() as log_dir:
        for repeat in range(args.repeats):
            without, with_, seconds = run_pair(args, first=repeat % 2, log_dir=log_dir)
            times[False] += without
            times[True] += with_
            hook_seconds += seconds
            ratios.append(statistics.median(with_) / statistics.median(without))
            print(f"pair {repeat + 1}/{args.repeats}: median step without {statistics.median(without) * 1e3:8.1f} ms, "
                  f"with {statistics.median(with_) * 1e3:8.1f} ms, ratio {ratios[-1]:.4f}")

    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    in_hooks = hook_seconds / sum(times[True])
    print(f"\n{args.model}-tiny, batch {args.batch_size}×{args.seq_len}, levels {LEVELS[args.model]}, "
          f"{len(times[True])} timed steps per arm, logging every {args.log_every} steps")
    print(f"median step without NestedScheduler: {without * 1e3:8.1f} ms")
    print(f"median step with NestedScheduler:    {with_ * 1e3:8.1f} ms")
    print(f"ratio with / without:                {with_ / without:8.4f}  (goal ≤ 1.02; "
          f"median of the pairs' ratios {statistics.median(ratios):.4f})")
    print(f"time inside the callback's hooks:    {in_hooks * 100:8.3f} % of the step with it")


if __name__ == "__main__":
    main()
