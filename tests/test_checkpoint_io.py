"""nl_lightning/checkpoint_io.py: a save either completes or leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nl_lightning.checkpoint_io import AtomicCheckpointIO, atomic_write
from tests.conftest import REPO_ROOT


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "last.ckpt"
    atomic_write(b"old", target)
    atomic_write(b"new contents", target)
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_write(b"old", target)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(b"new", target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_io_round_trips_a_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    state = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 3}
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])


def _train_forever(workdir: Path) -> subprocess.Popen:
    """nl-lightning fit that saves last.ckpt (~22 MB) after every step, resuming from it if it exists."""
    last = workdir / "runs" / "kill" / "version_0" / "checkpoints" / "last.ckpt"
    args = [
        sys.executable, "-m", "nl_lightning.cli", "fit",
        "--config", str(REPO_ROOT / "recipes/lm/base.yaml"), "--config", str(REPO_ROOT / "recipes/lm/models/transformer.yaml"),
        "--trainer.max_steps=100000", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.name=kill", "--trainer.logger.init_args.version=0",
        "--checkpoint.every_n_train_steps=1", "--data.init_args.max_bytes=300000", "--data.init_args.batch_size=2",
        "--data.init_args.seq_len=64", *(["--ckpt_path", str(last)] if last.exists() else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_during_saves(workdir: Path, kills: int, seed: int = 0) -> list[int]:
    """SIGKILL a training run at random moments after it has saved, ``kills`` times, resuming each
    time from what the previous one left; returns the global step of every last.ckpt it left."""
    rng = random.Random(seed)
    last = workdir / "runs" / "kill" / "version_0" / "checkpoints" / "last.ckpt"
    steps = []
    for _ in range(kills):
        before = last.stat().st_mtime_ns if last.exists() else None
        process = _train_forever(workdir)
        deadline = time.monotonic() + 300
        while not last.exists() or last.stat().st_mtime_ns == before:  # until this run has saved once
            if process.poll() is not None:
                raise AssertionError(f"the run exited ({process.returncode}): {process.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # saves take a good share of each step: many kills land mid-save
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        checkpoint = torch.load(last, map_location="cpu", weights_only=False)  # must load: never a partial file
        assert checkpoint["state_dict"] and checkpoint["global_step"] > 0
        steps.append(checkpoint["global_step"])
    return steps


def test_kills_during_saves_always_leave_a_loadable_last_checkpoint_that_resumes(tmp_path):
    steps = kill_during_saves(tmp_path, kills=3)
    assert steps == sorted(steps)  # each run resumed from the one before


@pytest.mark.slow
def test_fifty_kills_during_saves_leave_no_unreadable_checkpoint(tmp_path):
    steps = kill_during_saves(tmp_path, kills=50, seed=1)
    assert len(steps) == 50 and steps == sorted(steps)


def _fit(workdir: Path, model: str, *extra: str) -> Path:
    """Two steps of an LM recipe through the CLI (in ``workdir``); returns its last.ckpt."""
    from nl_lightning.cli import main

    previous = os.getcwd()
    os.chdir(workdir)
    try:
        main(["fit", "--config", str(REPO_ROOT / "recipes/lm/base.yaml"),
              "--config", str(REPO_ROOT / f"recipes/lm/models/{model}.yaml"),
              "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
              "--data.init_args.max_bytes=300000", "--data.init_args.batch_size=2", "--data.init_args.seq_len=64",
              "--trainer.logger.init_args.name=ckpt", *extra])
    finally:
        os.chdir(previous)
    return max(workdir.glob("runs/ckpt/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)


def test_a_truncated_checkpoint_fails_before_training_naming_the_file_and_the_others(tmp_path):
    last = _fit(tmp_path, "transformer")
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a crash mid-copy leaves
    with pytest.raises(ValueError, match=r"last\.ckpt cannot be read .* truncated or not a checkpoint.*"
                                         r"other checkpoints in .*: epoch=0-step=2\.ckpt"):
        _fit(tmp_path, "transformer", "--ckpt_path", str(last))


def test_a_missing_checkpoint_names_the_ones_that_exist(tmp_path):
    last = _fit(tmp_path, "transformer")
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt does not exist; other checkpoints in .*last\.ckpt"):
        _fit(tmp_path, "transformer", "--ckpt_path", str(last.with_name("nope.ckpt")))


def test_a_checkpoint_of_another_model_fails_before_training_naming_what_differs(tmp_path):
    last = _fit(tmp_path, "transformer")
    with pytest.raises(ValueError, match=r"does not fit this model: \d+ missing from it .*not in this model.*"
                                         r"build the model it was saved from"):
        _fit(tmp_path, "titans", "--ckpt_path", str(last))


def test_a_checkpoint_from_before_a_level_was_added_names_the_new_level(tmp_path):
    last = _fit(tmp_path, "hope")
    four_levels = '--model.init_args.network.init_args.overrides={cms_periods: [1, 4, 16, 64]}'
    with pytest.raises(ValueError, match=r"missing from it \(e\.g\. network\.blocks\.0\.cms\.levels\.3\..*with other shapes"):
        _fit(tmp_path, "hope", four_levels, "--ckpt_path", str(last))


def _checkpoint_dir(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "shard_0.pt").write_text(content)
    (path / "shard_1.pt").write_text(content)
    return path


def test_replace_directory_swaps_a_complete_directory_in(tmp_path):
    from nl_lightning.checkpoint_io import replace_directory

    target = _checkpoint_dir(tmp_path / "last.ckpt", "old")
    replace_directory(_checkpoint_dir(tmp_path / ".last.ckpt.tmp", "new"), target)
    assert (target / "shard_1.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_crash_between_the_renames_leaves_the_old_checkpoint_that_loading_puts_back(tmp_path, monkeypatch):
    from nl_lightning.checkpoint_io import recover_directory, replace_directory

    target = _checkpoint_dir(tmp_path / "last.ckpt", "old")
    staging = _checkpoint_dir(tmp_path / ".last.ckpt.tmp", "new")
    real_replace, calls = os.replace, []

    def crash_on_second(source, destination):
        calls.append(source)
        if len(calls) == 2:  # the old one has stepped aside, the new one not yet in: the machine dies
            raise KeyboardInterrupt("power cut")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(staging, target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()
    assert (recover_directory(target) / "shard_0.pt").read_text() == "old"
