"""experiments/recall.py: the recall study end to end at a minute's size, and its statistics."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import experiments.recall as recall  # `python -m pytest` runs from the repository root
from nl_lightning.data.longctx import make_mqar


def test_one_minute_study_writes_every_cell_with_wilson_intervals(tmp_path):
    out, png = tmp_path / "recall.csv", tmp_path / "recall.png"
    cells = recall.main([
        "--models", "titans", "transformer", "--steps", "2", "--train-length", "32", "--train-pairs", "4",
        "--window", "8", "--min-distance", "9", "--num-test", "8", "--batch-size", "4", "--out", str(out), "--plot", str(png),
        "--logs", str(tmp_path / "runs"),
    ])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == recall.COLUMNS
    cells_by = {(r["model"], r["task"], int(r["test_length"])): r for r in rows}
    # titans (linear time) reaches 64×, full attention stops at 16×
    assert {length for model, _, length in cells_by if model == "titans"} == {32, 128, 512, 2048}
    assert {length for model, _, length in cells_by if model == "transformer"} == {32, 128, 512}
    assert {task for _, task, _ in cells_by} == {"pairs1", "pairs4"}
    for r in rows:
        n, match, low, high = int(r["n"]), float(r["exact_match"]), float(r["ci_low"]), float(r["ci_high"])
        assert 0 <= low <= match <= high <= 1 and high > low
        assert n == {32: 8, 128: 8, 512: 2, 2048: 1}[int(r["test_length"])]
    assert png.stat().st_size > 0
    for read, cell in zip(recall.read_csv(out), cells, strict=True):  # the CSV keeps 4 decimals
        assert read.model == cell.model and read.test_length == cell.test_length and read.n == cell.n
        assert (read.exact_match, read.ci_low, read.ci_high) == pytest.approx(
            (cell.exact_match, cell.ci_low, cell.ci_high), abs=1e-4)
    assert "not run" in recall.table(cells)
    # two models, two workers: each ran in its own process and left its part and log
    assert all((tmp_path / "runs" / "parts" / f"{m}.{ext}").exists() for m in ("titans", "transformer")
               for ext in ("csv", "log"))


def test_a_failing_worker_stops_the_study_and_names_its_log(tmp_path):
    # Both workers fail (the override is bad for both) and run side by side, so either may be the
    # first to fail on a loaded machine: the error names whichever did, and its log says why.
    with pytest.raises(RuntimeError, match=r"(hope|titans) failed .*parts/\1\.log") as failure:
        recall.main(["--models", "hope", "titans", "--override", "memory_kind=bogus", "--steps", "1",
                     "--train-length", "32", "--window", "8", "--min-distance", "9", "--num-test", "2",
                     "--out", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png"),
                     "--logs", str(tmp_path / "runs")])
    failed = re.search(r"(hope|titans) failed", str(failure.value)).group(1)
    assert "memory_kind" in (tmp_path / "runs" / "parts" / f"{failed}.log").read_text()
    assert not (tmp_path / "r.csv").exists()


def test_wilson_interval_matches_the_closed_form():
    low, high = recall.wilson(45, 50)
    z, n, p = 1.959963984540054, 50, 0.9
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * (p * (1 - p) / n + z**2 / (4 * n**2)) ** 0.5
    assert low == pytest.approx(centre - half, abs=1e-9) and high == pytest.approx(centre + half, abs=1e-9)
    assert recall.wilson(0, 200)[0] == 0.0 and recall.wilson(0, 200)[1] < 0.02


def test_test_keys_lie_beyond_the_window():
    window = 16
    for task, pairs in recall.TASKS.items():
        rng = np.random.default_rng(0)
        for _ in range(50):
            sample = make_mqar(rng, 256, pairs, 1, window + 1)
            query = int(np.flatnonzero(sample.answer_mask)[0]) - 1
            keys = [i for i in range(query) if 128 <= sample.tokens[i] < 192]
            assert len(keys) == pairs and min(query - i for i in keys) > window


def test_titans_variants_differ_only_in_which_layers_attend():
    from nl_lightning.models.layers import CausalSelfAttention
    from nl_lightning.models.titans import TitansMemoryLayer

    counts = {}
    for name in ("titans", "titans_swa_only", "titans_memory_only"):
        network = recall.build_network(name, window=16)
        kinds = [type(block.mixer) for block in network.blocks]
        counts[name] = (kinds.count(CausalSelfAttention), kinds.count(TitansMemoryLayer))
        assert all(m.window == 16 for m in network.modules() if isinstance(m, CausalSelfAttention))
    assert counts == {"titans": (2, 2), "titans_swa_only": (4, 0), "titans_memory_only": (0, 4)}


@pytest.mark.parametrize("name", ["titans", "hope"])
def test_noshift_variants_differ_only_in_key_shift(name):
    shifted, base = recall.build_network(name, window=16), recall.build_network(f"{name}_noshift", window=16)
    assert shifted.config.key_shift and not base.config.key_shift
    assert base.config == type(base.config)(**{**vars(shifted.config), "key_shift": False})


def test_key_shift_leaves_the_attention_only_models_unchanged():
    # The study trains transformer and titans_swa_only once, for both conventions: key_shift acts
    # only in memory layers, so their parameters are the same with or without it.
    for name in ("transformer", "titans_swa_only"):
        torch.manual_seed(0)
        on = recall.build_network(name, window=16, overrides={"key_shift": True}).state_dict()
        torch.manual_seed(0)
        off = recall.build_network(name, window=16, overrides={"key_shift": False}).state_dict()
        assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)


def test_override_reads_booleans_numbers_and_names():
    args = recall.parse_args(["--override", "key_shift=true", "--override", "chunk_size=16",
                              "--override", "memory_kind=linear"])
    assert args.overrides == {"key_shift": True, "chunk_size": 16, "memory_kind": "linear"}


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(SystemExit):
        recall.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        recall.parse_args(["--override", "memory_kind"])
    with pytest.raises(ValueError, match="not a recall table"):
        bad = Path(recall.__file__).parent / "__init__.py"
        recall.read_csv(bad)


def test_a_diverged_model_is_recorded_as_such_and_the_study_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(recall, "train", lambda name, args: None)  # as train() reports a FloatingPointError
    cells = recall.main([
        "--models", "hope", "--train-length", "32", "--window", "8", "--min-distance", "9", "--num-test", "4",
        "--out", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png"), "--logs", str(tmp_path / "runs"),
    ])
    assert cells and all(c.model == "hope" and c.exact_match != c.exact_match for c in cells)  # NaN
    assert "training diverged" in recall.table(recall.read_csv(tmp_path / "r.csv"))
