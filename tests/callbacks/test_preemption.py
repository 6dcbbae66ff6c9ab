"""PreemptionCheckpoint: SIGTERM saves last.ckpt and exits 0; the resumed run is the uninterrupted one, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT

STEPS = 24  # 18 batches per epoch here: the resumed run crosses an epoch boundary


def _fit(workdir: Path, version: str, *extra: str) -> subprocess.Popen:
    """HOPE-tiny with its CMS schedule (NestedScheduler), through the CLI, on a 20 KB corpus."""
    args = [
        sys.executable, "-m", "nl_lightning.cli", "fit",
        *(arg for name in ("base", "models/hope", "schedules/cms") for arg in ("--config", str(REPO_ROOT / f"recipes/lm/{name}.yaml"))),
        f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.name=preempt", f"--trainer.logger.init_args.version={version}",
        "--checkpoint.every_n_train_steps=4", "--data.init_args.max_bytes=20000", "--data.init_args.batch_size=16",
        "--data.init_args.seq_len=64", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr.decode()[-3000:]


def test_sigterm_saves_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path):
    _finish(_fit(tmp_path, "straight"))
    checkpoints = tmp_path / "runs" / "preempt" / "cut" / "checkpoints"
    process = _fit(tmp_path, "cut")
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("epoch=*.ckpt")):  # training is under way (step 4 saved)
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _finish(process)  # a clean exit, not a crash
    stopped = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert 4 <= stopped["global_step"] < STEPS, stopped["global_step"]
    _finish(_fit(tmp_path, "cut", "--ckpt_path", "last"))

    straight = torch.load(tmp_path / "runs/preempt/straight/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == STEPS
    for name, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name
    assert same(straight["optimizer_states"], resumed["optimizer_states"])
    scheduler = next(key for key in straight["callbacks"] if key.startswith("NestedScheduler"))
    assert same(straight["callbacks"][scheduler], resumed["callbacks"][scheduler])  # the CMS levels' gradient sums


def same(a, b) -> bool:
    """Bit-equal nested containers of tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
