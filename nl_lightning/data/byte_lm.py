"""Byte-level language-modelling DataModule over text files (default: the Python stdlib sources)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from nl_lightning.data.byte_corpus import CorpusSpec, build_corpus, open_split, resolve_paths, stdlib_python_files


class ByteWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes → (input, next-byte target) pairs.

    The memory map is opened lazily in each worker, so the dataset pickles cheaply.
    """

    def __init__(self, path: Path, seq_len: int) -> None:
        self.path, self.seq_len = path, seq_len
        self.n_bytes = path.stat().st_size
        self._bytes: np.ndarray | None = None

    def __len__(self) -> int:
        return max(0, (self.n_bytes - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bytes is None:
            self._bytes = open_split(self.path.parent, self.path.stem)
        start = index * self.seq_len
        window = torch.from_numpy(np.asarray(self._bytes[start : start + self.seq_len + 1], dtype=np.int64))
        return window[:-1], window[1:]


class ByteLMDataModule(LightningDataModule):
    """Next-byte prediction over text files.

    Args:
        paths: files, directories or globs. ``None`` builds the default corpus from the Python
            standard library's ``.py`` files (always on the machine; nothing is downloaded).
        data_dir: where built corpora are cached (``<data_dir>/<name>/{train,val}.bin``).
        seq_len: bytes per training window.
        batch_size: windows per batch (per device).
        val_fraction: share of *files* that go to validation (deterministic by file name).
        max_bytes: cap on the corpus size (files are taken in a fixed pseudo-random order).
        num_workers: DataLoader workers.
    """

    vocab_size = 256

    def __init__(
        self,
        paths: list[str] | None = None,
        data_dir: str = "data",
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_bytes: int | None = 8_000_000,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; e.g. {name}: 16")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. 0.05")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or null (no cap), got {max_bytes}")
        self.save_hyperparameters()
        self.paths, self.data_dir = paths, Path(data_dir)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_fraction, self.max_bytes, self.num_workers = val_fraction, max_bytes, num_workers
        self.datasets: dict[str, ByteWindows] = {}

    @property
    def corpus_dir(self) -> Path:
        return self.data_dir / ("stdlib" if self.paths is None else "user-" + self._spec().fingerprint[:8])

    def _spec(self) -> CorpusSpec:
        files = stdlib_python_files() if self.paths is None else resolve_paths(list(self.paths))
        return CorpusSpec(tuple(files), self.val_fraction, self.max_bytes)

    def prepare_data(self) -> None:
        build_corpus(self._spec(), self.corpus_dir)

    def setup(self, stage: str | None = None) -> None:
        corpus_dir = build_corpus(self._spec(), self.corpus_dir)  # no-op when prepare_data built it
        for split in ("train", "val"):
            dataset = ByteWindows(corpus_dir / f"{split}.bin", self.seq_len)
            if len(dataset) == 0:
                raise ValueError(
                    f"seq_len={self.seq_len} needs at least {self.seq_len + 1} bytes, but the {split} split "
                    f"of {corpus_dir} has {dataset.n_bytes}; lower seq_len or add text"
                )
            self.datasets[split] = dataset
        if len(self.datasets["train"]) < self.batch_size:
            raise ValueError(
                f"the train split has {len(self.datasets['train'])} windows of seq_len={self.seq_len}, fewer than "
                f"batch_size={self.batch_size}; lower batch_size or seq_len, or add text"
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        # No third split: held-out evaluation uses the validation files.
        return self._loader("val", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
