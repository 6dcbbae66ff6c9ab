"""Byte-level language-modelling DataModule over text files (default: the Python stdlib sources)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from nl_lightning.data.sampling import ResumableRandomSampler
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
        val_lengths: extra validation window lengths (e.g. ``[1024]`` for 4× a ``seq_len`` of 256):
            each is one more validation dataloader over the same validation split, whose batches
            hold ``batch_size · seq_len // length`` windows (at least one), so that with
            ``limit_val_batches`` every length reads the same bytes and only the context differs.
            ``LanguageModel`` logs them as ``val/bpb@<length>`` (length generalisation).
        shuffle_seed: the training batches' order comes from its own generator with this seed, so
            runs with the same seed see the same batches whatever their models drew from the
            global RNG (paired comparisons between models); ``None`` shuffles with the global RNG.
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
        val_lengths: list[int] | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; e.g. {name}: 16")
        val_lengths = list(val_lengths or [])
        bad = [n for n in val_lengths if not isinstance(n, int) or isinstance(n, bool) or n <= 0]
        if bad or seq_len in val_lengths or len(set(val_lengths)) < len(val_lengths):
            raise ValueError(
                f"val_lengths must be distinct positive integers other than seq_len={seq_len} (which is always "
                f"validated), got {val_lengths!r}; e.g. val_lengths: [{4 * seq_len}]"
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; e.g. 0.05")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or null (no cap), got {max_bytes}")
        self.save_hyperparameters()
        self.paths, self.data_dir = paths, Path(data_dir)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_fraction, self.max_bytes, self.num_workers = val_fraction, max_bytes, num_workers
        self.val_lengths = tuple(val_lengths)
        if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
            raise ValueError(f"shuffle_seed must be an integer or null, got {shuffle_seed!r}; e.g. shuffle_seed: 0")
        self.shuffle_seed = shuffle_seed
        self._train_sampler: ResumableRandomSampler | None = None
        self._resume_at: tuple | None = None  # (epoch order, samples done) from a checkpoint
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
        for length in self.val_lengths:
            dataset = ByteWindows(corpus_dir / "val.bin", length)
            if len(dataset) == 0:
                raise ValueError(
                    f"val_lengths entry {length} needs at least {length + 1} bytes, but the val split of "
                    f"{corpus_dir} has {dataset.n_bytes}; drop it from val_lengths or add text"
                )
            self.datasets[f"val@{length}"] = dataset
        if len(self.datasets["train"]) < self.batch_size:
            raise ValueError(
                f"the train split has {len(self.datasets['train'])} windows of seq_len={self.seq_len}, fewer than "
                f"batch_size={self.batch_size}; lower batch_size or seq_len, or add text"
            )

    def _loader(self, split: str, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        sampler = generator = None
        if shuffle:
            generator = None if self.shuffle_seed is None else torch.Generator().manual_seed(self.shuffle_seed)
            sampler = self._train_sampler = ResumableRandomSampler(len(self.datasets[split]), generator)
            if self._resume_at is not None:
                sampler.resume(*self._resume_at)
                self._resume_at = None
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size or self.batch_size,
            sampler=sampler,
            generator=generator,  # as DataLoader(shuffle=True, generator=...) draws from it too
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def state_dict(self) -> dict:
        """Where the training batches are (saved in every checkpoint): how the current epoch's order
        was drawn and how many of its batches were trained on, so a resumed run continues with the
        batches an uninterrupted one would see."""
        sampler, trainer = self._train_sampler, self._trainer_or_none()
        if sampler is None or sampler.origin is None or trainer is None:
            return {}
        return {"train_order": sampler.origin,
                "train_batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        done = state_dict["train_batches_done"]
        if done * self.batch_size < len(self.datasets.get("train", ())) or "train" not in self.datasets:
            self._resume_at = (state_dict["train_order"], done * self.batch_size)

    def _trainer_or_none(self):
        try:
            return self.trainer
        except RuntimeError:
            return None

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.val_lengths:
            return self._loader("val", shuffle=False)
        # The same bytes per batch at every length: only the context a byte is predicted from differs.
        tokens = self.batch_size * self.seq_len
        return [self._loader("val", shuffle=False)] + [
            self._loader(f"val@{n}", shuffle=False, batch_size=max(1, tokens // n)) for n in self.val_lengths
        ]

    def test_dataloader(self) -> DataLoader:
        # No third split: held-out evaluation uses the validation files.
        return self._loader("val", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
