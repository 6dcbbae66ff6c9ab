import json
import math

import numpy as np
import pytest
import torch

from nl_lightning.data import ByteLMDataModule
from nl_lightning.data.byte_corpus import CorpusSpec, assign_splits, resolve_paths, stdlib_python_files


def make_datamodule(tmp_path, paths, **kwargs) -> ByteLMDataModule:
    kwargs = {"seq_len": 32, "batch_size": 4, "val_fraction": 0.3, **kwargs}
    return ByteLMDataModule(paths=paths, data_dir=str(tmp_path / "cache"), **kwargs)


def test_windows_are_consecutive_bytes_of_the_files(tmp_path, text_dir):
    dm = make_datamodule(tmp_path, [str(text_dir)])
    dm.prepare_data()
    dm.setup("fit")
    meta = json.loads((dm.corpus_dir / "meta.json").read_text())
    expected = b"".join(open(p, "rb").read() for p in meta["splits"]["train"])
    inputs, targets = dm.datasets["train"][3]
    assert inputs.dtype == torch.long and inputs.shape == (32,)
    assert bytes(inputs.tolist()) == expected[96:128]
    assert bytes(targets.tolist()) == expected[97:129]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32)


def test_split_is_by_file_deterministic_and_disjoint(tmp_path, text_dir):
    files = resolve_paths([str(text_dir / "*.py")])
    spec = CorpusSpec(tuple(files), val_fraction=0.3, max_bytes=None)
    first, second = assign_splits(spec), assign_splits(spec)
    assert first == second
    assert set(first["train"]).isdisjoint(first["val"])
    assert sorted(first["train"] + first["val"]) == files
    assert first["train"] and first["val"]


def test_corpus_is_built_once_and_rebuilt_when_sources_change(tmp_path, text_dir):
    dm = make_datamodule(tmp_path, [str(text_dir)])
    dm.prepare_data()
    train_bin = dm.corpus_dir / "train.bin"
    built_at = train_bin.stat().st_mtime_ns
    make_datamodule(tmp_path, [str(text_dir)]).prepare_data()
    assert train_bin.stat().st_mtime_ns == built_at
    (text_dir / "file_0.py").write_text("changed " * 500)
    dm = make_datamodule(tmp_path, [str(text_dir)])
    dm.prepare_data()
    meta = json.loads((dm.corpus_dir / "meta.json").read_text())
    assert sum(meta["sizes"].values()) == sum(p.stat().st_size for p in text_dir.iterdir())


def test_splits_are_memory_mapped_uint8(tmp_path, text_dir):
    dm = make_datamodule(tmp_path, [str(text_dir)])
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.datasets["val"]
    dataset[0]
    assert isinstance(dataset._bytes, np.memmap) and dataset._bytes.dtype == np.uint8


def test_default_corpus_comes_from_the_python_stdlib():
    files = stdlib_python_files()
    assert len(files) > 100
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert any(f.endswith("os.py") for f in files)


def test_max_bytes_caps_the_corpus(tmp_path, text_dir):
    files = tuple(resolve_paths([str(text_dir)]))
    spec = CorpusSpec(files, val_fraction=0.3, max_bytes=10_000)
    kept = sum(len(v) for v in assign_splits(spec).values())
    file_size = (text_dir / "file_0.py").stat().st_size
    assert kept == math.ceil(10_000 / file_size) < len(files)


def test_a_path_that_matches_nothing_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no file matches '.*nowhere/\*\.txt'"):
        make_datamodule(tmp_path, [str(tmp_path / "nowhere/*.txt")]).prepare_data()


def test_an_empty_corpus_raises(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(ValueError, match="the corpus is empty"):
        make_datamodule(tmp_path, [str(tmp_path / "*.txt")]).prepare_data()


def test_a_single_file_cannot_be_split_by_file(tmp_path):
    (tmp_path / "only.txt").write_text("x" * 1000)
    with pytest.raises(ValueError, match="need at least 2"):
        make_datamodule(tmp_path, [str(tmp_path / "only.txt")]).prepare_data()


def test_seq_len_larger_than_the_corpus_raises_with_the_fix(tmp_path, text_dir):
    dm = make_datamodule(tmp_path, [str(text_dir)], seq_len=1_000_000)
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"seq_len=1000000 needs at least 1000001 bytes.*lower seq_len"):
        dm.setup("fit")


@pytest.mark.parametrize("batch_size", [0, -3])
def test_non_positive_batch_size_raises(tmp_path, batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size}"):
        make_datamodule(tmp_path, None, batch_size=batch_size)


def test_non_positive_seq_len_raises(tmp_path):
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        make_datamodule(tmp_path, None, seq_len=0)


def test_too_few_train_windows_for_one_batch_raises(tmp_path, text_dir):
    dm = make_datamodule(tmp_path, [str(text_dir)], seq_len=2048, batch_size=64)
    dm.prepare_data()
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        dm.setup("fit")


def test_val_lengths_read_the_same_bytes_per_batch_at_every_length(tmp_path, text_dir):
    data = ByteLMDataModule([str(text_dir)], data_dir=str(tmp_path / "data"), seq_len=16, batch_size=8,
                            val_fraction=0.3, val_lengths=[64, 128])
    data.setup("fit")
    loaders = data.val_dataloader()
    assert len(loaders) == 3
    first = [next(iter(loader)) for loader in loaders]
    assert [tuple(inputs.shape) for inputs, _ in first] == [(8, 16), (2, 64), (1, 128)]
    # every loader's first batch is the first 128 validation bytes, cut into windows of its length
    flat = [inputs.flatten() for inputs, _ in first]
    assert torch.equal(flat[0], flat[1]) and torch.equal(flat[0], flat[2])


@pytest.mark.parametrize("val_lengths", [[0], [16], [64, 64], [True]])
def test_bad_val_lengths_raise_with_an_example(tmp_path, val_lengths):
    with pytest.raises(ValueError, match=r"val_lengths must be distinct positive integers other than seq_len=16.*e\.g\. val_lengths: \[64\]"):
        ByteLMDataModule(data_dir=str(tmp_path), seq_len=16, val_lengths=val_lengths)


def test_a_val_length_longer_than_the_val_split_names_it(tmp_path, text_dir):
    data = ByteLMDataModule([str(text_dir)], data_dir=str(tmp_path / "data"), seq_len=16, batch_size=2,
                            val_fraction=0.3, val_lengths=[10**7])
    with pytest.raises(ValueError, match="val_lengths entry 10000000 needs at least 10000001 bytes"):
        data.setup("fit")


def test_shuffle_seed_gives_the_same_batches_whatever_the_global_rng_did(tmp_path, text_dir):
    def first_batches(seed, draws):
        data = ByteLMDataModule([str(text_dir)], data_dir=str(tmp_path / "data"), seq_len=16, batch_size=4,
                                val_fraction=0.3, shuffle_seed=seed)
        data.setup("fit")
        torch.manual_seed(123)
        torch.randn(draws)  # a model of another size consumes a different amount of the global RNG
        loader = iter(data.train_dataloader())
        return [next(loader)[0] for _ in range(3)]

    same = [torch.equal(a, b) for a, b in zip(first_batches(0, 1), first_batches(0, 1000))]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(first_batches(0, 1), first_batches(1, 1)))


def test_a_non_integer_shuffle_seed_raises(tmp_path):
    with pytest.raises(ValueError, match="shuffle_seed must be an integer or null, got '0'"):
        ByteLMDataModule(data_dir=str(tmp_path), shuffle_seed="0")


def test_builds_running_at_once_do_not_break_each_other(tmp_path, text_dir, monkeypatch):
    """Sweep workers on a fresh checkout build the same corpus at the same time. Here a second
    build runs to completion between the first one's write and its rename (the order that broke
    a worker with FileNotFoundError when both wrote one shared temporary name); both succeed and
    leave the complete corpus."""
    import os

    from nl_lightning.data import byte_corpus

    spec = CorpusSpec(tuple(resolve_paths([str(text_dir / "*.py")])), val_fraction=0.3, max_bytes=None)
    out_dir = tmp_path / "cache"
    real_replace, interleaved = os.replace, []

    def replace_after_a_concurrent_build(src, dst):
        if not interleaved:
            interleaved.append(str(src))
            byte_corpus.build_corpus(spec, out_dir)  # the other worker, start to finish
        real_replace(src, dst)

    monkeypatch.setattr(byte_corpus.os, "replace", replace_after_a_concurrent_build)
    byte_corpus.build_corpus(spec, out_dir)
    assert interleaved and not list(out_dir.glob("*.tmp"))
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["fingerprint"] == spec.fingerprint
    splits = assign_splits(spec)
    for split in ("train", "val"):
        expected = b"".join(open(p, "rb").read() for p in splits[split])
        assert (out_dir / f"{split}.bin").read_bytes() == expected
