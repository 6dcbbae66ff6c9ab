"""Muon and M3 against AdamW on HOPE-tiny: optimizer step time, and validation loss after the same steps.

    .venv/bin/python -m benchmarks.optimizers                    # both parts
    .venv/bin/python -m benchmarks.optimizers --part time --steps 32
    .venv/bin/python -m benchmarks.optimizers --part loss --train-steps 60

    # on a GPU (issue #6's goal: Muon <= 1.3x, M3 <= 1.5x AdamW's step time), one command:
    .venv/bin/python -m benchmarks.optimizers --part time --device cuda --steps 64
    .venv/bin/python -m benchmarks.optimizers --part time --device cuda --steps 64 --dtype bfloat16

(a) ``time``: one HOPE-tiny (``Hope(preset="tiny")``) per optimizer, the LanguageModel's param groups
(CMS periods 1/4/16 included, so every optimizer is level-aware and skips the same slow levels), the
same random gradients; optimizers take turns step by step and only ``optimizer.step()`` is timed
(between ``torch.cuda.synchronize()`` calls on CUDA, so queued kernels are counted). The baseline is
the stronger of torch's two fast AdamW implementations on the device, LevelAwareAdamW with
``foreach=True`` and with ``fused=True`` (both are timed; ratios are medians against the faster).
``--dtype`` sets the parameters' dtype (``bfloat16``: pure-bf16 training; ``float32``: fp32 master
weights as under Lightning's bf16-mixed), ``--ns-dtype`` Muon/M3's Newton–Schulz precision (default:
bfloat16 on CUDA, float32 on CPU). The cost of one training step's forward + backward (batch 16 × 256
bytes in the parameters' dtype, no autocast; every ``--fwd-bwd-every`` steps, 0 = skip) is measured in
the same loop, so the table also shows what the optimizer adds to a whole training step, the number
that decides whether it pays.

(b) ``loss``: HOPE-tiny trains ``--train-steps`` steps from the same seed with each optimizer, built
as ``recipes/lm/base.yaml`` + ``models/hope.yaml`` + ``optim/<optimizer>.yaml`` build it (the
optimizers' settings below are those recipes'; DGD and DMGD take only ``--dgd-lr`` / ``--dmgd-lr``,
their other settings at their defaults), then validates on ``--val-batches`` batches. One short run
per optimizer and no tuning beyond the recipes' learning rates: it shows gross differences (a
blow-up, a stall), not a ranking. ``M3 (plain 1/√V)`` is M3 with ``normalize_update=False`` (see
nl_lightning/optim/m3.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

import nl_lightning.optim as optim
from benchmarks.devices import resolve_device
from benchmarks.timing import time_call
from nl_lightning.data import ByteLMDataModule
from nl_lightning.models import Hope
from nl_lightning.modules import LanguageModel


# -- (a) step time ------------------------------------------------------------------------------


BASELINES = ("AdamW (foreach)", "AdamW (fused)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed_optimizers(device: torch.device, dtype: torch.dtype,
                     ns_dtype: str | None) -> dict[str, tuple[LanguageModel, torch.optim.Optimizer]]:
    torch.manual_seed(0)
    network = Hope(preset="tiny").to(device=device, dtype=dtype)
    adamw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    makers = {
        "AdamW (foreach)": lambda g: optim.LevelAwareAdamW(g, foreach=True, **adamw),
        "AdamW (fused)": lambda g: optim.LevelAwareAdamW(g, fused=True, **adamw),
        "Muon": lambda g: optim.Muon(g, weight_decay=0.1, ns_dtype=ns_dtype),
        "M3": lambda g: optim.M3(g, weight_decay=0.1, ns_dtype=ns_dtype),
    }
    runs = {}
    for name, make in makers.items():
        module = LanguageModel(copy.deepcopy(network))
        runs[name] = (module, make(module._param_groups()))
    return runs


def step_time(steps: int, device: torch.device, dtype: torch.dtype, ns_dtype: str | None, fwd_bwd_every: int) -> None:
    runs = timed_optimizers(device, dtype, ns_dtype)
    module = next(iter(runs.values()))[0]
    tokens = torch.randint(0, 256, (16, 257), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    params = list(module.network.parameters())
    times: dict[str, list[float]] = {name: [] for name in [*runs, "forward+backward"]}

    # Not time_interleaved: every step draws new gradients for all optimizers, and forward+backward
    # is sampled every few steps only, so the loop is this benchmark's own; each call is time_call's.
    def timed(fn) -> float:
        return time_call(fn, device)[0]

    def forward_backward() -> None:
        loss = F.cross_entropy(module(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()

    warmup = 1  # untimed; 16 timed steps then cover one full CMS cycle (periods 1, 4, 16)
    for step in range(warmup + steps):
        grads = [torch.randn(p.shape, generator=generator, device=device, dtype=dtype) * 1e-2 for p in params]
        for name, (run_module, optimizer) in runs.items():
            for p, g in zip(run_module.network.parameters(), grads):
                p.grad = g.clone()
            elapsed = timed(optimizer.step)
            if step >= warmup:
                times[name].append(elapsed)
        # On a CPU forward+backward costs ~10 optimizer steps and varies little: sample it.
        if fwd_bwd_every and step % fwd_bwd_every == 0:
            elapsed = timed(forward_backward)
            if step >= warmup or device.type == "cpu":  # the first CUDA forward pays for kernel loading
                times["forward+backward"].append(elapsed)
            module.zero_grad(set_to_none=True)
    median = {name: statistics.median(values) for name, values in times.items() if values}
    baseline = min(BASELINES, key=median.__getitem__)
    base, fwd_bwd = median[baseline], median.get("forward+backward")
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\n(a) optimizer step on HOPE-tiny ({sum(p.numel() for p in params):,} {str(dtype).removeprefix('torch.')} "
          f"params, {device.type}, {threads}, Newton–Schulz in "
          f"{ns_dtype or ('bfloat16' if device.type == 'cuda' else 'float32')}), median of {steps} interleaved steps; "
          f"baseline: {baseline}; forward+backward (16×256 bytes): "
          f"{f'{fwd_bwd * 1e3:.1f} ms' if fwd_bwd else 'not measured'}\n")
    print("| optimizer | step ms | step vs AdamW | train step (fwd+bwd+step) vs AdamW |")
    print("| --- | ---: | ---: | ---: |")
    for name in runs:
        whole = f"{(fwd_bwd + median[name]) / (fwd_bwd + base):.2f}x" if fwd_bwd else "-"
        print(f"| {name} | {median[name] * 1e3:.2f} | {median[name] / base:.2f}x | {whole} |")


# -- (b) validation loss ------------------------------------------------------------------------


def loss_optimizers(dgd_lr: float, dmgd_lr: float) -> dict[str, tuple[partial, list]]:
    """Per row: the optimizer (a partial of its class, as recipes/lm/optim/<name>.yaml sets it) and
    the callbacks it needs."""
    from nl_lightning.callbacks import DGDInputCapture  # here: only part (b) trains with callbacks

    adamw_half = dict(adamw_lr=3e-3, adamw_betas=(0.9, 0.95))
    m3 = dict(lr=0.02, betas=(0.95, 0.99, 0.9), alpha=0.5, slow_period=8, weight_decay=0.1, **adamw_half)
    return {
        "AdamW": (partial(optim.LevelAwareAdamW, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)), []),
        "Muon": (partial(optim.Muon, lr=0.02, momentum=0.95, weight_decay=0.1, **adamw_half), []),
        "M3": (partial(optim.M3, normalize_update=True, **m3), []),
        "M3 (plain 1/√V)": (partial(optim.M3, normalize_update=False, **m3), []),
        "DGD": (partial(optim.DGD, lr=dgd_lr), [DGDInputCapture()]),
        "DMGD": (partial(optim.DMGD, lr=dmgd_lr), []),
    }


def final_val_loss(optimizer: partial, callbacks: list, steps: int, val_batches: int, batch_size: int, seq_len: int,
                   workdir: Path) -> float:
    """Validation loss of HOPE-tiny after ``steps`` steps with ``optimizer`` (the LM recipes' seed,
    schedule and gradient clipping)."""
    lightning.seed_everything(0, verbose=False)
    module = LanguageModel(Hope("tiny"), optimizer=optimizer, warmup_steps=30, lr_schedule="cosine")
    data = ByteLMDataModule(seq_len=seq_len, batch_size=batch_size, max_bytes=2_000_000)
    trainer = Trainer(
        max_steps=steps, limit_val_batches=val_batches, val_check_interval=None, check_val_every_n_epoch=1000,
        gradient_clip_val=1.0, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=workdir,
    )
    trainer.fit(module, datamodule=data)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return metrics["val/loss"]


def validation_loss(steps: int, val_batches: int, batch_size: int, seq_len: int, dgd_lr: float, dmgd_lr: float,
                    only: list[str] | None) -> None:
    optimizers = loss_optimizers(dgd_lr, dmgd_lr)
    unknown = sorted(set(only or []) - set(optimizers))
    if unknown:
        raise SystemExit(f"--only {unknown}: not among {list(optimizers)}")
    print(f"\n(b) HOPE-tiny, byte corpus, {steps} steps of {batch_size}×{seq_len} bytes (recipes/lm/optim settings, "
          f"seed 0), val loss on {val_batches} batches\n")
    print("| optimizer | class | lr | val loss (nats/byte) | wall s |\n| --- | --- | ---: | ---: | ---: |", flush=True)
    for name, (optimizer, callbacks) in optimizers.items():
        if only and name not in only:
            continue
        start = time.perf_counter()  # wall time of a whole training run, for the reader's budget
        with tempfile.TemporaryDirectory() as workdir:
            try:
                loss = final_val_loss(optimizer, callbacks, steps, val_batches, batch_size, seq_len, Path(workdir))
                loss = f"{loss:.3f}"
            except FloatingPointError as error:  # a blow-up is a result, not a crash of the benchmark
                loss = f"diverged ({str(error)[:40]}…)"
        # Printed as each run ends, so a run cut short still reports the rows it finished.
        print(f"| {name} | {optimizer.func.__name__} | {optimizer.keywords.get('lr')} | {loss} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["time", "loss", "both"], default="both")
    parser.add_argument("--steps", type=int, default=16, help="timed optimizer steps for (a)")
    parser.add_argument("--device", default="cpu", help="(a) only: cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="(a): the parameters' dtype")
    parser.add_argument("--ns-dtype", choices=["float32", "bfloat16"], default=None,
                        help="(a): Muon/M3's Newton–Schulz precision (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--fwd-bwd-every", type=int, default=4,
                        help="(a): time forward+backward every N steps (0 = never; the last column is then '-')")
    parser.add_argument("--train-steps", type=int, default=60, help="training steps for (b)")
    parser.add_argument("--val-batches", type=int, default=8)
    # The recipes train on 16×256; the default here is a quarter of that per step so that six runs finish
    # in minutes on a shared CPU. Pass --batch-size 16 --seq-len 256 for the recipes' exact batches.
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="names of the (b) rows to run (default: all)")
    parser.add_argument("--dgd-lr", type=float, default=0.05, help="DGD's lr in (b) (its docstring's example)")
    parser.add_argument("--dmgd-lr", type=float, default=0.05, help="DMGD's lr in (b)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.fwd_bwd_every < 0:
        parser.error(f"--steps {args.steps} must be >= 1 and --fwd-bwd-every {args.fwd_bwd_every} >= 0")
    if args.part in ("time", "both"):
        step_time(args.steps, resolve_device(args.device), DTYPES[args.dtype], args.ns_dtype, args.fwd_bwd_every)
    if args.part in ("loss", "both"):
        validation_loss(args.train_steps, args.val_batches, args.batch_size, args.seq_len, args.dgd_lr, args.dmgd_lr,
                        args.only)


if __name__ == "__main__":
    main()
