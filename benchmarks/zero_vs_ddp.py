"""Step time of DeepSpeed ZeRO-2 (CPUDeepSpeedStrategy) vs DDP (gloo) on 2 CPU processes (SPEC §7).

Same model, same global batch, same optimizer (AdamW), N timed steps after a few warm-up steps;
rank 0's median step time (on_train_batch_start → on_train_batch_end: forward, backward, gradient
communication and optimizer step) for each, and the ratio ZeRO-2 / DDP:

    python -m benchmarks.zero_vs_ddp                       # small MLP (~1.6M params)
    python -m benchmarks.zero_vs_ddp --model transformer   # Transformer++ tiny on random bytes
    python -m benchmarks.zero_vs_ddp --steps 40 --warmup 5

Each strategy runs in a fresh process (Lightning re-launches the module for rank 1), so neither
inherits the other's process group. On 2 CPU cores this measures overhead, not the memory
savings ZeRO exists for: both ranks share the cores, and DDP overlaps its all-reduce with backward
while ZeRO-2 reduce-scatters gradients and all-gathers updated parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(model_name: str):
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import LightningModule
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    class Steps(Dataset):
        def __len__(self):
            return 1_000_000

        def __getitem__(self, index):
            return index

    class Bench(LightningModule):
        def __init__(self, global_batch: int = 32):
            super().__init__()
            torch.manual_seed(0)
            self.global_batch = global_batch
            if model_name == "transformer":
                from nl_lightning.models.transformer import TransformerPP

                self.net = TransformerPP("tiny")
                self.seq_len, self.vocab = 128, self.net.config.vocab_size
            else:
                self.net = nn.Sequential(nn.Linear(256, 512), nn.GELU(), *[m for _ in range(5) for m in
                                         (nn.Linear(512, 512), nn.GELU())], nn.Linear(512, 256))

        def training_step(self, batch, batch_idx):
            world, rank = self.trainer.world_size, self.global_rank
            generator = torch.Generator().manual_seed(self.global_step)
            local = self.global_batch // world
            if model_name == "transformer":
                tokens = torch.randint(0, self.vocab, (self.global_batch, self.seq_len + 1), generator=generator)
                tokens = tokens[rank * local:(rank + 1) * local]
                logits = self.net(tokens[:, :-1])
                return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
            x = torch.randn(self.global_batch, 256, generator=generator)[rank * local:(rank + 1) * local]
            return F.mse_loss(self.net(x), torch.sin(x))

        def train_dataloader(self):
            return DataLoader(Steps(), batch_size=1)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return Bench()


def worker(mode: str, model_name: str, steps: int, warmup: int, out: str) -> None:
    import torch
    from lightning.pytorch import Callback, Trainer

    # A callback, not benchmarks.timing: the step runs inside the Trainer of a 2-process job, and
    # only the hooks around it see where it starts and ends.
    class Timer(Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.start)

    if mode == "zero2":
        from nl_lightning.strategies import CPUDeepSpeedStrategy

        strategy = CPUDeepSpeedStrategy(stage=2)
    else:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    model, timer = build(model_name), Timer()
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=warmup + steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer])
    trainer.fit(model)
    if trainer.is_global_zero:
        timed = timer.times[warmup:]
        params = sum(p.numel() for p in build(model_name).parameters())
        Path(out).write_text(json.dumps({"median_s": statistics.median(timed), "mean_s": statistics.mean(timed),
                                         "steps": len(timed), "params": params,
                                         "threads": torch.get_num_threads()}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "transformer"], default="mlp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker", choices=["ddp", "zero2"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.steps, args.warmup, args.out)
        return
    # One thread per rank: the 2 ranks share the 2 cores. The workers run in a scratch directory (for
    # what Lightning and DeepSpeed write there), so the checkout goes on their PYTHONPATH to import
    # this module; Lightning starts rank 1 as `python -m benchmarks.zero_vs_ddp` too.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": pythonpath}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "zero2"):
            out = os.path.join(tmp, f"{mode}.json")
            command = [sys.executable, "-m", "benchmarks.zero_vs_ddp", "--worker", mode, "--model", args.model,
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", out]
            proc = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(out):
                sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
            results[mode] = json.loads(Path(out).read_text())
    ddp, zero = results["ddp"], results["zero2"]
    print(f"model={args.model} params={ddp['params']:,} processes=2 threads/rank={ddp['threads']} "
          f"timed steps={ddp['steps']} (after {args.warmup} warm-up)")
    for name, r in (("DDP (gloo)", ddp), ("ZeRO-2 (CPUDeepSpeedStrategy)", zero)):
        print(f"  {name:30s} median {r['median_s'] * 1e3:8.2f} ms/step   mean {r['mean_s'] * 1e3:8.2f} ms/step")
    print(f"  ratio ZeRO-2 / DDP (median): {zero['median_s'] / ddp['median_s']:.2f}x")


if __name__ == "__main__":
    main()
