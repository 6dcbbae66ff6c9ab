"""Every model family learns: validation loss falls on the default corpus within a short run; and
experiments/lm_compare.py compares them."""

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

import experiments.lm_compare as lm_compare
from nl_lightning.data import ByteLMDataModule
from nl_lightning.models import Hope, Titans, TransformerPP
from nl_lightning.modules import LanguageModel


@pytest.mark.slow
@pytest.mark.parametrize("family", [TransformerPP, Titans, Hope], ids=lambda f: f.__name__)
def test_validation_loss_falls_within_a_short_run(family, tmp_path):
    seed_everything(0)
    network = family("tiny", overrides={"n_layer": 2})
    module = LanguageModel(network, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), warmup_steps=5)
    data = ByteLMDataModule(data_dir=str(tmp_path / "data"), seq_len=128, batch_size=8, max_bytes=2_000_000)
    trainer = Trainer(max_steps=60, limit_val_batches=4, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    (before,) = trainer.validate(module, data, verbose=False)
    trainer.fit(module, data)
    (after,) = trainer.validate(module, data, verbose=False)
    assert before["val/loss"] == pytest.approx(math.log(256), abs=0.15)
    assert after["val/loss"] < before["val/loss"] - 1.5, (before, after)


def test_lm_compare_trains_in_a_subprocess_and_prints_the_table(tmp_path, capsys):
    """experiments/lm_compare.py end to end at its smallest: one step, one seed, one model."""
    runs = lm_compare.main(["--steps", "1", "--seeds", "0", "--models", "transformer",
                            "--val-batches", "1", "--out", str(tmp_path)])
    (result,) = runs["transformer"]
    assert result["tokens"] == 16 * 256  # one step of the recipe's batch × sequence length
    assert math.isfinite(result["bpb"]) and 6.0 < result["bpb"] < 9.0  # near log2(256) after one step
    assert 0 < result["tokens_per_s"] < 1e7  # tokens per second, not per millisecond or per step
    assert 100 < result["max_rss_mib"] < 24 * 1024  # torch alone is > 100 MiB; MiB, not KiB or bytes
    assert "| transformer | 1,869,504 | 4,096 |" in capsys.readouterr().out
    assert list(tmp_path.glob("transformer_tiny/version_*/events.out.tfevents.*"))  # logged where --out says


def test_lm_compare_refuses_a_non_positive_step_count():
    with pytest.raises(SystemExit):
        lm_compare.main(["--steps", "0"])
