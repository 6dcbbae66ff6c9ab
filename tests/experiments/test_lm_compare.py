"""Every model family learns: validation loss falls on the default corpus within a short run; and
experiments/lm_compare.py compares them."""

import csv
import math

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

import experiments.lm_compare as lm_compare
from experiments.recipes import set_path
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


def quick(tmp_path, text_dir, *extra) -> list[str]:
    """The comparison at a test's size: two models, two rates, two seeds, 4 steps of 2 × 32 bytes."""
    return ["--models", "hope_cms", "--steps", "4", "--val-every", "2", "--seeds", "0", "1",
            "--learning-rates", "0.003", "0.006", "--out", str(tmp_path / "lm.csv"), "--plot", str(tmp_path / "lm.png"),
            "--logs", str(tmp_path / "runs"), "--set", f"data.init_args.paths=[{text_dir}]",
            f"data.init_args.data_dir={tmp_path / 'data'}", "data.init_args.seq_len=32", "data.init_args.batch_size=2",
            "data.init_args.val_lengths=[128]", "data.init_args.val_fraction=0.3", "trainer.limit_val_batches=2", *extra]


def test_comparison_selects_a_rate_then_runs_the_seeds_and_reports_paired_intervals(tmp_path, text_dir, capsys):
    rows = lm_compare.main(quick(tmp_path, text_dir))
    with (tmp_path / "lm.csv").open() as f:
        written = list(csv.DictReader(f))
    assert tuple(written[0]) == lm_compare.COLUMNS and len(written) == len(rows)
    # both rates with seed 0, then seed 1 at the chosen rate only; a row at every validation (steps 2 and 4)
    runs = {(r["model"], r["lr"], r["seed"]) for r in written}
    spec = lm_compare.load_spec(lm_compare.parse_args(quick(tmp_path, text_dir)))
    for model in ("transformer", "hope_cms"):  # the baseline runs whatever --models says
        chosen = lm_compare.chosen_lr(spec, written, model)
        finals = {float(r["lr"]): float(r["val_bpb"]) for r in written
                  if r["model"] == model and r["seed"] == "0" and r["step"] == "4"}
        assert chosen == min(finals, key=finals.get)
        assert {(lr, seed) for m, lr, seed in runs if m == model} == {("0.003", "0"), ("0.006", "0"), (f"{chosen:g}", "1")}
    assert {r["step"] for r in written} == {"2", "4"}
    assert all(r["tokens"] == str(int(r["step"]) * 2 * 32) for r in written)  # equal tokens per step for every model
    assert all(math.isfinite(float(r["val_bpb_4x"])) and float(r["tokens_per_s"]) > 0 for r in written)
    assert all(100 < float(r["peak_rss_mib"]) < 24 * 1024 for r in written)  # MiB, one fresh process per run
    out = capsys.readouterr().out
    assert "| hope_cms |" in out and "[" in out  # the paired interval
    assert any(line.startswith("hope_cms at 4× the training length:") for line in out.splitlines())
    assert (tmp_path / "lm.png").stat().st_size > 0
    assert list((tmp_path / "runs" / "hope_cms").glob("*/events.out.tfevents.*"))


def test_a_rerun_skips_the_runs_the_csv_has(tmp_path, text_dir, capsys):
    lm_compare.main(quick(tmp_path, text_dir, "--seeds", "0", "--learning-rates", "0.003"))
    before = (tmp_path / "lm.csv").read_text()
    capsys.readouterr()
    lm_compare.main(quick(tmp_path, text_dir, "--seeds", "0", "--learning-rates", "0.003"))
    assert "started" not in capsys.readouterr().out
    assert (tmp_path / "lm.csv").read_text() == before


def test_the_same_seed_gives_every_model_the_same_batches(tmp_path):
    spec = lm_compare.load_spec(lm_compare.parse_args([]))
    configs = {m: lm_compare.run_config(spec, m, 0.003, 1, tmp_path) for m in spec["models"]}
    data = {m: c["data"] for m in spec["models"] for c in [configs[m]]}
    assert all(d == data["transformer"] for d in data.values())
    assert data["transformer"]["init_args"]["shuffle_seed"] == 1
    assert all(c["seed_everything"] == 1 and c["trainer"]["max_steps"] == spec["steps"] for c in configs.values())
    assert {c["model"]["init_args"]["optimizer"]["init_args"]["lr"] for c in configs.values()} == {0.003}


def test_the_spec_names_the_five_models_of_the_issue_with_their_schedules(tmp_path):
    spec = lm_compare.load_spec(lm_compare.parse_args([]))
    assert list(spec["models"]) == ["transformer", "titans", "hope_no_schedule", "hope_cms", "hope_cms_in_context"]
    callbacks = {m: [c["class_path"] for c in lm_compare.run_config(spec, m, 0.003, 0, tmp_path)["trainer"]["callbacks"] or []]
                 for m in spec["models"]}
    scheduler = "nl_lightning.callbacks.NestedScheduler"
    assert scheduler not in callbacks["hope_no_schedule"]
    assert scheduler in callbacks["hope_cms"] and scheduler in callbacks["hope_cms_in_context"]
    overrides = lm_compare.run_config(spec, "hope_cms_in_context", 0.003, 0, tmp_path)["model"]["init_args"]["network"]["init_args"]["overrides"]
    assert overrides["cms_in_context"] is True


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "must be positive"),
    (["--steps", "250", "--val-every", "100"], "steps a multiple of val_every"),
    (["--models", "gpt"], "unknown models"),
])
def test_bad_arguments_exit_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        lm_compare.main(argv)


def test_the_report_of_a_comparison_in_progress_lists_the_finished_models(tmp_path, capsys):
    """--table on a CSV whose baseline has no finished run yet (a comparison still running, or
    stopped early) prints what there is instead of failing on the missing baseline."""
    out = tmp_path / "lm.csv"
    rows = [dict(model="hope_cms", lr=lr, seed=0, step=600, tokens=600 * 2048, val_bpb=bpb, val_bpb_4x=bpb + 0.1,
                 tokens_per_s=1000, peak_rss_mib=1000, diverged=False) for lr, bpb in ((0.001, 2.4), (0.003, 2.2), (0.006, 2.1))]
    lm_compare.write_rows(out, rows, ["hope_cms"])
    lm_compare.main(["--table", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| hope_cms | 2.400 | 2.200 | 2.100 * |" in printed
    assert "| hope_cms | 0.006 | 2.100 |" in printed
    assert "transformer" not in printed.split("Learning rate")[1].split("At 600")[0]


CHUNK_SPEC = lm_compare.REPO_ROOT / "recipes" / "sweeps" / "chunk_size.yaml"


def test_the_chunk_size_spec_gives_each_model_its_chunk_and_its_family_as_baseline(tmp_path):
    spec = lm_compare.load_spec(lm_compare.parse_args(["--spec", str(CHUNK_SPEC)]))
    configs = {m: lm_compare.run_config(spec, m, 0.003, 2, tmp_path) for m in spec["models"]}
    for model, config in configs.items():
        family, sizes = model.split("_c")  # <family>_c<chunk>[_p<projection chunk>]
        chunk, _, proj_chunk = sizes.partition("_p")
        proj_chunk = proj_chunk or (chunk if family == "hope" else "64")
        network = config["model"]["init_args"]["network"]
        assert network["class_path"] == f"nl_lightning.models.{'Hope' if family == 'hope' else 'Titans'}"
        overrides = network["init_args"]["overrides"] or {}
        expected = {} if chunk == "64" else {"chunk_size": int(chunk)}  # 64: the preset's own
        if proj_chunk != "64":
            expected["proj_chunk_size"] = int(proj_chunk)
        assert overrides == expected, model
        default = (chunk, proj_chunk) == ("64", "64")
        assert lm_compare.model_entry(spec, model)["baseline"] == ("titans_c64" if default else f"{family}_c64")
        assert config["data"] == configs["titans_c64"]["data"]  # the same bytes for every model of a seed
    assert configs["titans_c64"]["data"]["init_args"]["seq_len"] == 1024


def _write_rows(path, finals):
    """A finished comparison's CSV: one final row per (model, seed) at lr 0.003, 300 steps."""
    rows = [dict(model=model, lr=0.003, seed=seed, step=300, tokens=300 * 2048, val_bpb=bpb, val_bpb_4x=bpb + 0.5,
                 tokens_per_s=1000, peak_rss_mib=900, diverged=False) for (model, seed), bpb in finals.items()]
    lm_compare.write_rows(path, rows, [])


def test_a_model_with_its_own_baseline_is_compared_to_it(tmp_path, capsys):
    out = tmp_path / "chunks.csv"
    finals = {("titans_c64", s): 2.0 for s in (0, 1, 2)}
    finals |= {("hope_c64", s): 2.2 + 0.01 * s for s in (0, 1, 2)}
    finals |= {("hope_c256", s): 2.5 + 0.01 * s for s in (0, 1, 2)}  # +0.3 on hope_c64, +0.5 on titans_c64
    _write_rows(out, finals)
    lm_compare.main(["--table", "--spec", str(CHUNK_SPEC), "--out", str(out), "--models", "hope_c256"])
    printed = capsys.readouterr().out
    assert "differences are to each model's baseline" in printed
    assert "| hope_c256 (vs hope_c64) | 0.003 | 2.500 / 2.510 / 2.520 | +0.300 / +0.300 / +0.300 |" in printed
    assert "hope_c256 at the training length: worse than hope_c64 (+0.300 bits/byte" in printed
    # --models hope_c256 keeps its baseline and the baseline's own
    assert "| hope_c64 (vs titans_c64) | 0.003 | 2.200 / 2.210 / 2.220 | +0.200 / +0.210 / +0.220 |" in printed
    assert "| titans_c64 | 0.003 |" in printed and "titans_c256" not in printed


@pytest.mark.parametrize("entry, message", [
    ({"config": ["recipes/lm/base.yaml"]}, "a mapping with 'configs'"),
    ({"configs": ["recipes/lm/base.yaml"], "baseline": "gpt"}, "its baseline 'gpt' is not one of the spec's models"),
])
def test_a_bad_model_entry_in_a_spec_exits_naming_it(tmp_path, entry, message):
    spec = yaml.safe_load(lm_compare.SPEC.read_text())
    spec["models"]["broken"] = entry
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match=f"model 'broken' of {path}: .*{message}"):
        lm_compare.main(["--spec", str(path), "--table", "--out", str(tmp_path / "none.csv")])


def test_an_override_sets_a_key_under_one_the_composed_config_left_unset():
    config = {"model": {"init_args": {"network": {"init_args": {"overrides": None}}}}}
    set_path(config, "model.init_args.network.init_args.overrides.chunk_size", 256)
    assert config["model"]["init_args"]["network"]["init_args"]["overrides"] == {"chunk_size": 256}


def test_the_chunk_size_study_runs(tmp_path, text_dir):
    """recipes/sweeps/chunk_size.yaml for a few steps: HOPE at chunk 256, with its baselines (HOPE at 64, Titans)."""
    argv = quick(tmp_path, text_dir, "--spec", str(CHUNK_SPEC), "--seeds", "0", "--learning-rates", "0.003")
    argv[argv.index("hope_cms")] = "hope_c256"
    rows = lm_compare.main(argv)
    assert {r["model"] for r in rows} == {"hope_c256", "hope_c64", "titans_c64"}
    assert all(math.isfinite(float(r["val_bpb"])) for r in rows)
