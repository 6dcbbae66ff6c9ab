"""Five language models at equal parameters and equal tokens, with paired intervals (issue 23).

    .venv/bin/python -m experiments.lm_compare            # the comparison: docs/data/lm_compare.csv + plot
    .venv/bin/python -m experiments.lm_compare --table    # its tables, from the CSV
    .venv/bin/python -m experiments.lm_compare --steps 4 --seeds 0 1 --learning-rates 0.003 0.006 \\
        --models transformer hope_cms --set data.init_args.batch_size=2 --out /tmp/lm.csv   # a quick look

The spec (``recipes/sweeps/lm_compare.yaml``) names each model's composition of ``recipes/lm/``
(a list of files, or a mapping with ``configs``, ``overrides`` of that model's own, applied after the
spec's, and ``baseline``, the model its differences are to, by default the spec's ``baseline``;
``recipes/sweeps/chunk_size.yaml`` uses both):
Transformer++, Titans, HOPE without the CMS schedule, HOPE with its CMS levels on their own
timescales (``NestedScheduler``), and HOPE with the scheduled and in-context CMS; all tiny (≈1.9M
parameters), with the memory defaults. Every run is built by LightningCLI from its composition and
the spec's overrides, as ``nl-lightning fit`` would build it, so all models train on the same
tokens in the same order per seed (``ByteLMDataModule.shuffle_seed``).

Protocol:

1. learning rate per model: one run per rate in ``learning_rates`` with ``select_seed``; the lowest
   final validation bits/byte wins (a diverged run loses);
2. ``seeds`` at the chosen rate, ``steps`` optimizer steps each (the selection run is that seed's run).

Every ``val_every`` steps a run records validation bits/byte at the training length and at 4× it
(the same bytes, more context: ``val_lengths``), the training tokens/s so far (training steps only)
and the peak resident memory of its process. Runs go ``--workers`` at a time, each in a fresh
one-thread process, longest first; each finished run's rows are appended to ``--out`` at once, and
a rerun skips the runs ``--out`` already has (a stopped comparison resumes where it stopped).

The report (``--table``) gives, per model, the final validation bits/byte per seed, the per-seed
paired difference to the baseline (same seed, same batches) with a bootstrap 95% interval, the same
at 4× the training length, tokens/s relative to the baseline and peak memory.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import math
import resource
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import yaml

from experiments.common import DATA_DIR, REPO_ROOT, key_values, paired_interval
from experiments.recipes import build, compose, set_path

SPEC = REPO_ROOT / "recipes" / "sweeps" / "lm_compare.yaml"
COLUMNS = ("model", "lr", "seed", "step", "tokens", "val_bpb", "val_bpb_4x", "tokens_per_s", "peak_rss_mib",
           "diverged")
# Relative cost of a training step, for the longest-first order (the in-context CMS runs its
# fast weights besides).
COST = {"hope_cms_in_context": 2.4, "hope_cms": 2.0, "hope_no_schedule": 2.0, "titans": 1.0, "transformer": 1.0}


# -- one run, in a worker process -----------------------------------------------------------------


def _recorder(model: str, lr: float, seed: int, long_length: int):
    from lightning.pytorch import Callback

    class Recorder(Callback):
        """A row after every validation: tokens so far, val bits/byte at both lengths, training
        tokens/s over the training steps only, peak RSS of this process."""

        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.train_seconds, self.tokens, self._started = 0.0, 0, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self._started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.train_seconds += time.perf_counter() - self._started
            self.tokens += batch[1].numel()

        def on_validation_end(self, trainer, module) -> None:
            metrics = trainer.callback_metrics
            self.rows.append(row(model, lr, seed, trainer.global_step, self.tokens, float(metrics["val/bpb"]),
                                 float(metrics[f"val/bpb@{long_length}"]), self.tokens / max(self.train_seconds, 1e-9)))

    return Recorder()


def row(model, lr, seed, step, tokens, val_bpb, val_bpb_4x, tokens_per_s, diverged=False) -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(model=model, lr=lr, seed=seed, step=step, tokens=tokens, val_bpb=val_bpb, val_bpb_4x=val_bpb_4x,
                tokens_per_s=tokens_per_s, peak_rss_mib=peak, diverged=diverged or not math.isfinite(val_bpb))


def run_one(run: dict) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # one core per worker: the workers share the machine evenly
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", ".*LightningCLI.s args parameter.*")  # the spec, not this argv, is the config
    recorder = _recorder(run["model"], run["lr"], run["seed"], run["long_length"])
    cli = build(run["config"])
    cli.trainer.callbacks.append(recorder)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except FloatingPointError:  # LanguageModel stops a non-finite loss: record the divergence, keep going
        recorder.rows.append(row(run["model"], run["lr"], run["seed"], cli.trainer.global_step, recorder.tokens,
                                 math.nan, math.nan, math.nan, diverged=True))
    return recorder.rows


# -- planning ---------------------------------------------------------------------------------------


MODEL_KEYS = ("configs", "overrides", "baseline")


def model_entry(spec: dict, model: str) -> dict:
    """A spec model as a mapping: ``configs`` (recipe files), ``overrides`` (its own, dotted paths)
    and ``baseline`` (the model its paired differences are to)."""
    entry = spec["models"][model]
    entry = {"configs": entry} if isinstance(entry, list) else entry
    return {"overrides": {}, "baseline": spec["baseline"], **entry}


def run_config(spec: dict, model: str, lr: float, seed: int, logs: Path) -> dict:
    entry = model_entry(spec, model)
    config = copy.deepcopy(compose(entry["configs"]))
    overrides = {
        "trainer.max_steps": spec["steps"], "trainer.val_check_interval": spec["val_every"],
        "trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": str(logs), "name": model, "version": f"lr{lr:g}_seed{seed}"}},
        **spec.get("overrides", {}),
        **entry["overrides"],
    }
    for path, value in overrides.items():
        set_path(config, path, seed if value == "{seed}" else lr if value == "{lr}" else value)
    return config


def complete_runs(rows: list[dict], steps: int) -> set[tuple]:
    """(model, lr, seed) of the runs that reached ``steps`` or diverged."""
    return {(r["model"], float(r["lr"]), int(r["seed"])) for r in rows
            if int(r["step"]) >= steps or str(r["diverged"]) == "True"}


def final_rows(rows: list[dict]) -> dict[tuple, dict]:
    """The last row of every run, keyed by (model, lr, seed)."""
    last: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], float(r["lr"]), int(r["seed"]))
        if key not in last or int(r["step"]) >= int(last[key]["step"]):
            last[key] = r
    return last


def chosen_lr(spec: dict, rows: list[dict], model: str) -> float | None:
    """The rate whose ``select_seed`` run ended lowest (None until every rate has run)."""
    last = final_rows(rows)
    scores = {}
    for lr in spec["learning_rates"]:
        r = last.get((model, float(lr), spec["select_seed"]))
        if r is None or (r["model"], float(lr), spec["select_seed"]) not in complete_runs([r], spec["steps"]):
            return None
        scores[float(lr)] = math.inf if str(r["diverged"]) == "True" else float(r["val_bpb"])
    return min(scores, key=lambda lr: (scores[lr], lr))


def next_runs(spec: dict, rows: list[dict], models: list[str], started: set[tuple]) -> list[tuple]:
    """Runs that can start now: every model's selection runs, then its seeds once its rate is chosen."""
    done = complete_runs(rows, spec["steps"])
    runs = [(m, float(lr), spec["select_seed"]) for m in models for lr in spec["learning_rates"]]
    for model in models:
        lr = chosen_lr(spec, rows, model)
        if lr is not None:
            runs += [(model, lr, seed) for seed in spec["seeds"]]
    fresh = [run for run in dict.fromkeys(runs) if run not in done and run not in started]
    return sorted(fresh, key=lambda run: -COST.get(run[0], 1.0))


# -- CSV --------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict], order: list[str]) -> None:
    rank = {m: i for i, m in enumerate(order)}
    rows = sorted(rows, key=lambda r: (rank.get(r["model"], len(rank)), float(r["lr"]), int(r["seed"]), int(r["step"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **{k: _format(k, r[k]) for k in COLUMNS}})


def _format(key: str, value) -> str:
    if key in ("val_bpb", "val_bpb_4x"):
        return f"{float(value):.4f}"
    if key in ("tokens_per_s", "peak_rss_mib"):
        return f"{float(value):.0f}" if math.isfinite(float(value)) else "nan"
    if key == "lr":
        return f"{float(value):g}"
    return str(value)


# -- report -----------------------------------------------------------------------------------------


def tables(spec: dict, rows: list[dict]) -> str:
    models = [m for m in spec["models"] if any(r["model"] == m for r in rows)]
    last = final_rows(rows)
    lines = ["Learning rate (final validation bits/byte of the selection run, seed "
             f"{spec['select_seed']}; * = chosen):", "",
             "| model | " + " | ".join(f"lr {lr:g}" for lr in spec["learning_rates"]) + " |",
             "|---" * (len(spec["learning_rates"]) + 1) + "|"]
    chosen = {m: chosen_lr(spec, rows, m) for m in models}
    for m in models:
        cells = []
        for lr in spec["learning_rates"]:
            r = last.get((m, float(lr), spec["select_seed"]))
            text = "–" if r is None else "diverged" if str(r["diverged"]) == "True" else f"{float(r['val_bpb']):.3f}"
            cells.append(text + (" *" if chosen[m] == float(lr) else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")

    seeds = spec["seeds"]
    baselines = {m: model_entry(spec, m)["baseline"] for m in models}
    shared = len(set(baselines.values())) == 1

    def finals(model: str, column: str) -> dict[int, float]:
        lr = chosen.get(model)  # None: the model has no finished selection run yet
        if lr is None:
            return {}
        return {s: float(last[(model, lr, s)][column]) for s in seeds
                if (model, lr, s) in last and int(last[(model, lr, s)]["step"]) >= spec["steps"]}

    to = next(iter(baselines.values())) if shared else "each model's baseline (after its name)"
    lines += ["", f"At {spec['steps']} steps, seeds {', '.join(map(str, seeds))} at each model's rate; "
              f"differences are to {to}, seed by seed (bootstrap 95% interval of the mean):", "",
              "| model | lr | val bits/byte per seed | − baseline per seed | mean [95% CI] | @4× per seed "
              "| @4× − baseline, mean [95% CI] | tokens/s vs baseline | peak RSS (MiB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        base = baselines[m]
        name = m if shared or m == base else f"{m} (vs {base})"
        base_bpb, base_long, base_speed = finals(base, "val_bpb"), finals(base, "val_bpb_4x"), finals(base, "tokens_per_s")
        bpb, long, speed, rss = (finals(m, c) for c in ("val_bpb", "val_bpb_4x", "tokens_per_s", "peak_rss_mib"))
        if not bpb:
            lines.append(f"| {name} | {chosen[m] if chosen[m] is not None else '–'} | runs missing | | | | | | |")
            continue
        paired = [s for s in bpb if s in base_bpb]
        cells = [" / ".join(f"{bpb[s]:.3f}" for s in bpb)]
        for values, baseline in ((bpb, base_bpb), (long, base_long)):
            diffs = [values[s] - baseline[s] for s in paired]
            low, high = paired_interval(diffs)
            if values is bpb:
                cells.append(" / ".join(f"{d:+.3f}" for d in diffs) if m != base else "–")
            else:
                cells.append(" / ".join(f"{long[s]:.3f}" for s in long))
            cells.append(f"{np.mean(diffs):+.3f} [{low:+.3f}, {high:+.3f}]" if m != base and diffs else "–")
        ratio = np.mean([speed[s] / base_speed[s] for s in paired]) if paired else math.nan
        cells += [f"{ratio:.2f}× ({np.mean(list(speed.values())):,.0f})", f"{np.mean(list(rss.values())):,.0f}"]
        lines.append(f"| {name} | {chosen[m]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(spec: dict, rows: list[dict]) -> list[str]:
    """One line per model and length: is its difference to the baseline outside the interval?"""
    out = []
    last = final_rows(rows)
    for m in spec["models"]:
        base = model_entry(spec, m)["baseline"]
        lr, base_lr = chosen_lr(spec, rows, m), chosen_lr(spec, rows, base)
        if m == base or lr is None or base_lr is None:
            continue
        for column, where in (("val_bpb", "at the training length"), ("val_bpb_4x", "at 4× the training length")):
            diffs = [float(last[(m, lr, s)][column]) - float(last[(base, base_lr, s)][column]) for s in spec["seeds"]
                     if (m, lr, s) in last and (base, base_lr, s) in last]
            if not diffs:
                continue
            low, high = paired_interval(diffs)
            verdict = ("better than" if high < 0 else "worse than" if low > 0 else "not separated from")
            out.append(f"{m} {where}: {verdict} {base} ({np.mean(diffs):+.3f} bits/byte [{low:+.3f}, {high:+.3f}], "
                       f"{len(diffs)} seeds)")
    return out


def plot(spec: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for index, model in enumerate(m for m in spec["models"] if any(r["model"] == m for r in rows)):
        lr = chosen_lr(spec, rows, model)
        if lr is None:
            continue
        color = f"C{index}"
        for ax, column in zip(axes, ("val_bpb", "val_bpb_4x")):
            curves = {}
            for r in rows:
                if r["model"] == model and float(r["lr"]) == lr and str(r["diverged"]) != "True":
                    curves.setdefault(int(r["seed"]), []).append((int(r["tokens"]), float(r[column])))
            for points in curves.values():
                ax.plot(*zip(*sorted(points)), color=color, alpha=0.25, linewidth=0.8)
            tokens = sorted({t for points in curves.values() for t, _ in points})
            mean = [np.mean([v for points in curves.values() for t2, v in points if t2 == t]) for t in tokens]
            ax.plot(tokens, mean, color=color, marker="o", markersize=3, label=f"{model} (lr {lr:g})")
    for ax, title in zip(axes, ("at the training length", "at 4× the training length")):
        ax.set_xlabel("training tokens")
        ax.set_title(f"validation bits/byte {title}")
    axes[0].set_ylabel("bits/byte (mean of seeds; thin: each seed)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--models", nargs="+", help="subset of the spec's models (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the spec's seeds")
    parser.add_argument("--learning-rates", nargs="+", type=float, help="override the spec's learning rates")
    parser.add_argument("--steps", type=int, help="override the spec's steps")
    parser.add_argument("--val-every", type=int, help="override the spec's val_every")
    parser.add_argument("--set", nargs="+", default=[], metavar="PATH=VALUE",
                        help="extra overrides for every run, e.g. data.init_args.batch_size=2")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--out", type=Path, default=DATA_DIR / "lm_compare.csv")
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "docs" / "img" / "lm_compare.png")
    parser.add_argument("--logs", type=Path, default=Path("runs") / "lm_compare", help="TensorBoard logs of every run")
    parser.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    return parser.parse_args(argv)


def load_spec(args: argparse.Namespace) -> dict:
    spec = yaml.safe_load(args.spec.read_text())
    for key, value in (("seeds", args.seeds), ("learning_rates", args.learning_rates), ("steps", args.steps),
                       ("val_every", args.val_every)):
        if value is not None:
            spec[key] = value
    if spec["select_seed"] not in spec["seeds"]:
        spec["select_seed"] = spec["seeds"][0]
    unknown = [m for m in args.models or [] if m not in spec["models"]]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; the spec {args.spec} has {list(spec['models'])}")
    for model in spec["models"]:
        entry = spec["models"][model]
        if isinstance(entry, dict) and (set(entry) - set(MODEL_KEYS) or "configs" not in entry):
            raise SystemExit(f"model {model!r} of {args.spec}: a list of recipe files, or a mapping with 'configs' and "
                             f"optionally 'overrides' and 'baseline'; got the keys {sorted(entry)}")
        baseline = model_entry(spec, model)["baseline"]
        if baseline not in spec["models"]:
            raise SystemExit(f"model {model!r} of {args.spec}: its baseline {baseline!r} "
                             f"is not one of the spec's models {list(spec['models'])}")
    if args.models:  # a model's baseline always runs, and the baseline's own
        keep, todo = set(), list(args.models)
        while todo:
            model = todo.pop()
            if model not in keep:
                keep.add(model)
                todo.append(model_entry(spec, model)["baseline"])
        spec["models"] = {m: spec["models"][m] for m in spec["models"] if m in keep}
    spec["overrides"] = {**spec.get("overrides", {}), **key_values(args.set, "--set", "data.init_args.batch_size=2")}
    if spec["steps"] <= 0 or spec["val_every"] <= 0 or spec["steps"] % spec["val_every"]:
        raise SystemExit(f"steps ({spec['steps']}) and val_every ({spec['val_every']}) must be positive, with "
                         "steps a multiple of val_every (the last step is validated)")
    return spec


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    spec = load_spec(args)
    rows = read_rows(args.out)
    if args.table:
        print(tables(spec, rows), *[""] + verdicts(spec, rows), sep="\n")
        return rows
    models = list(spec["models"])
    started_at, started, running = time.perf_counter(), set(), {}
    try:
        while True:
            for run in next_runs(spec, rows, models, started)[: args.workers - len(running)]:
                model, lr, seed = run
                config = run_config(spec, model, lr, seed, args.logs.resolve())
                (long_length,) = config["data"]["init_args"]["val_lengths"]
                job = dict(model=model, lr=lr, seed=seed, long_length=long_length, config=config)
                # A fresh process per run: its peak RSS is the run's own.
                pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
                running[pool.submit(run_one, job)] = (run, pool)
                started.add(run)
                print(f"{model} lr {lr:g} seed {seed}: started", flush=True)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                (model, lr, seed), pool = running.pop(future)
                pool.shutdown()
                new = future.result()
                rows = [r for r in rows if (r["model"], float(r["lr"]), int(r["seed"])) != (model, lr, seed)] + new
                write_rows(args.out, rows, models)  # after every run: a stopped comparison keeps what it ran
                end = new[-1] if new else {}
                print(f"{model} lr {lr:g} seed {seed}: step {end.get('step')}, val bits/byte "
                      f"{end.get('val_bpb', math.nan):.3f} ({time.perf_counter() - started_at:.0f} s so far)", flush=True)
    finally:
        for _, pool in running.values():
            pool.shutdown(cancel_futures=True)
    rows = read_rows(args.out)
    plot(spec, rows, args.plot)
    print(tables(spec, rows), *[""] + verdicts(spec, rows), sep="\n")
    print(f"\nwrote {args.out} and {args.plot} in {time.perf_counter() - started_at:.0f} s")
    return rows


if __name__ == "__main__":
    main()
