"""Synthetic long-context recall tasks over the byte vocabulary: passkey, needle-in-a-haystack, MQAR.

Every sample is a byte sequence whose *last* bytes are the answer; ``answer_mask`` marks them
(for MQAR: the value after every queried key). Training and evaluation read the model's
next-byte predictions only at those positions.

Samples are generated on the fly from ``numpy.random.default_rng([seed, split, length, index])``,
so a (seed, split, length, index) always gives the same bytes, whatever the worker or order,
and the train / val / test splits are independent random streams. Needle-in-a-haystack draws
its haystack from the byte-level corpus (``data/byte_corpus.py``): train from the train files,
val/test from the held-out files, so no haystack text is shared between training and evaluation.
Passkeys and NIAH codes are split too (:func:`is_held_out`): evaluation answers never occur as
training answers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from nl_lightning.data.byte_corpus import CorpusSpec, build_corpus, open_split, resolve_paths, stdlib_python_files

RecallTask = Literal["passkey", "niah", "mqar"]
TASKS: tuple[str, ...] = ("passkey", "niah", "mqar")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

# Passkey retrieval (Mohtashami & Jaggi, 2023): a repeated filler sentence hides one number.
PASSKEY_PREFIX = b"There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
PASSKEY_FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = b" What is the pass key? The pass key is "

# MQAR (Arora et al., 2023, "Zoology") over bytes: keys, values and filler come from disjoint byte
# ranges, so a key can only be answered by recalling its pair, never by guessing from the range.
MQAR_KEYS = np.arange(128, 192, dtype=np.uint8)
MQAR_VALUES = np.arange(192, 256, dtype=np.uint8)
MQAR_FILLER = np.arange(ord("a"), ord("z") + 1, dtype=np.uint8)


@dataclass(frozen=True)
class RecallSample:
    """One generated sequence: ``tokens`` (uint8, the full length), ``answer_mask`` (bool, True on
    answer bytes) and ``depths`` (relative position in [0, 1] of each needle / key–value pair
    within the haystack: 0 = right after the prefix, 1 = right before the question)."""

    tokens: np.ndarray
    answer_mask: np.ndarray
    depths: np.ndarray

    @property
    def answer(self) -> bytes:
        return self.tokens[self.answer_mask].tobytes()


def is_held_out(answer: bytes) -> bool:
    """Whether an answer is reserved for evaluation: one in ten, by a hash a model cannot learn.

    Training never sees a held-out passkey/code as an answer and evaluation sees nothing else,
    so no evaluation sample can repeat a training sample and retrieval cannot be memorisation.
    """
    return zlib.crc32(answer) % 10 == 0


def _digits(rng: np.random.Generator, n: int, held_out: bool | None = None) -> bytes:
    """``n`` random digits; ``held_out`` True/False restricts them to the evaluation/training answers."""
    while True:
        answer = bytes(rng.integers(ord("0"), ord("9") + 1, size=n, dtype=np.uint8))
        if held_out is None or is_held_out(answer) == held_out:
            return answer


def _insert_needle(
    rng: np.random.Generator, length: int, prefix: bytes, needle: bytes, question: bytes, answer: bytes, haystack
) -> RecallSample:
    """``prefix + haystack[:p] + needle + haystack[p:] + question + answer`` of exactly ``length`` bytes,
    with the insertion point ``p`` uniform over every byte offset of the haystack."""
    fixed = len(prefix) + len(needle) + len(question) + len(answer)
    haystack_len = length - fixed
    if haystack_len < 0:
        raise ValueError(f"length={length} is too short for this task: it needs at least {fixed} bytes; raise the length")
    hay = haystack(haystack_len)
    at = int(rng.integers(0, haystack_len + 1))
    tokens = np.frombuffer(prefix + hay[:at] + needle + hay[at:] + question + answer, dtype=np.uint8).copy()
    mask = np.zeros(length, dtype=bool)
    mask[length - len(answer) :] = True
    return RecallSample(tokens, mask, np.array([at / max(haystack_len, 1)]))


def make_passkey(rng: np.random.Generator, length: int, digits: int = 5, held_out: bool | None = None) -> RecallSample:
    """Passkey retrieval: a ``digits``-long number hidden at a uniform depth in repeated filler text.

    ``held_out``: draw the key from the evaluation answers (True), the training answers (False) or any (None).
    """
    key = _digits(rng, digits, held_out)
    needle = b" The pass key is " + key + b". Remember it. " + key + b" is the pass key. "

    def filler(n: int) -> bytes:
        return (PASSKEY_FILLER * (n // len(PASSKEY_FILLER) + 1))[:n]

    return _insert_needle(rng, length, PASSKEY_PREFIX, needle, PASSKEY_QUESTION, key, filler)


def make_niah(
    rng: np.random.Generator, length: int, corpus: np.ndarray, digits: int = 6, held_out: bool | None = None
) -> RecallSample:
    """Needle in a haystack: ``The secret code of <name> is <digits>.`` inside a window of real text.

    The 6-letter name is repeated in the question, so the model has to find *that* needle; the
    haystack is a contiguous window of ``corpus`` at a uniform random offset. ``held_out`` as in
    :func:`make_passkey`.
    """
    name = bytes(rng.integers(ord("a"), ord("z") + 1, size=6, dtype=np.uint8))
    code = _digits(rng, digits, held_out)
    needle = b"\nThe secret code of " + name + b" is " + code + b".\n"
    question = b"\nWhat is the secret code of " + name + b"? The secret code of " + name + b" is "

    def haystack(n: int) -> bytes:
        if len(corpus) < n:
            raise ValueError(
                f"the haystack corpus has {len(corpus)} bytes, fewer than the {n} a {length}-byte sample needs; "
                "give more text (haystack_paths / corpus_max_bytes) or lower the length"
            )
        start = int(rng.integers(0, len(corpus) - n + 1))
        return np.asarray(corpus[start : start + n]).tobytes()

    return _insert_needle(rng, length, b"", needle, question, code, haystack)


def make_mqar(
    rng: np.random.Generator, length: int, num_pairs: int = 8, num_queries: int | None = None, min_distance: int = 0
) -> RecallSample:
    """Multi-query associative recall: ``num_pairs`` (key, value) byte pairs at uniform random positions
    in random filler, then ``num_queries`` of the keys in random order, each followed by its value.

    The answer is every queried value (the query marker is the key itself). ``min_distance``: every
    pair's key lies at least this many bytes before the first query (set it above an attention
    window to make the memory the only way to the answer).
    """
    num_queries = num_pairs if num_queries is None else num_queries
    if not 1 <= num_pairs <= len(MQAR_KEYS):
        raise ValueError(f"num_pairs must be in [1, {len(MQAR_KEYS)}] (one byte per key), got {num_pairs}")
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_queries must be in [1, num_pairs={num_pairs}], got {num_queries}")
    if not isinstance(min_distance, int) or min_distance < 0:
        raise ValueError(f"min_distance must be a non-negative integer, got {min_distance!r}")
    context = length - 2 * num_queries
    slots = max(0, (context - max(min_distance, 2)) // 2 + 1)  # pair starts 0, 2, ... ≤ context - min_distance
    if slots < num_pairs:
        raise ValueError(
            f"length={length} cannot hold {num_pairs} pairs and {num_queries} queries with every key "
            f"{min_distance} bytes before the queries (needs at least "
            f"{2 * (num_pairs + num_queries) + max(min_distance - 2, 0)} bytes); raise the length or lower "
            "num_pairs / min_distance"
        )
    keys = rng.choice(MQAR_KEYS, size=num_pairs, replace=False)
    values = rng.choice(MQAR_VALUES, size=num_pairs, replace=True)
    tokens = rng.choice(MQAR_FILLER, size=length)
    starts = 2 * rng.choice(slots, size=num_pairs, replace=False)
    tokens[starts], tokens[starts + 1] = keys, values
    queried = rng.permutation(num_pairs)[:num_queries]
    query_pos = context + 2 * np.arange(num_queries)
    tokens[query_pos], tokens[query_pos + 1] = keys[queried], values[queried]
    mask = np.zeros(length, dtype=bool)
    mask[query_pos + 1] = True
    return RecallSample(tokens.astype(np.uint8), mask, starts / max(2 * (slots - 1), 1))


class RecallDataset(Dataset):
    """``num_samples`` generated sequences of one task, split and length → ``(inputs, targets, answer_mask)``.

    ``inputs``/``targets`` are the sequence shifted by one byte; ``answer_mask[t]`` is True when
    ``targets[t]`` is an answer byte.
    """

    def __init__(self, generate, length: int, num_samples: int, seed: int, split: str) -> None:
        self.generate, self.length, self.num_samples = generate, length, num_samples
        self.seed, self.split = seed, split

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> RecallSample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], self.length, index])
        return self.generate(rng, self.length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.sample(index)
        tokens = torch.from_numpy(sample.tokens.astype(np.int64))
        return tokens[:-1], tokens[1:], torch.from_numpy(sample.answer_mask[1:].copy())


class CurriculumBatches(Dataset):
    """Whole training batches of MQAR whose length grows in stages (a curriculum over length).

    Item ``step`` is the batch of optimizer step ``step``: stage ``min(step // stage_steps, last)``
    of ``lengths``, ``tokens // length`` sequences of that length (every stage costs about the same
    per step, so short stages see many more answers), each with ``min(num_pairs, length // 8)``
    pairs, all queried. Deterministic in (seed, length, step), like :class:`RecallDataset`. Use it
    with ``DataLoader(batch_size=None)`` and in order (``shuffle=False``).
    """

    def __init__(self, lengths: list[int], stage_steps: int, tokens: int, num_pairs: int, seed: int,
                 num_batches: int = 10**6) -> None:
        self.lengths, self.stage_steps, self.tokens = list(lengths), stage_steps, tokens
        self.num_pairs, self.seed, self.num_batches = num_pairs, seed, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def stage(self, step: int) -> tuple[int, int, int]:
        """(length, sequences, pairs) of the batch of ``step``."""
        length = self.lengths[min(step // self.stage_steps, len(self.lengths) - 1)]
        return length, max(1, self.tokens // length), max(1, min(self.num_pairs, length // 8))

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= step < self.num_batches:
            raise IndexError(f"step {step} out of range for {self.num_batches} batches")
        length, sequences, pairs = self.stage(step)
        rng = np.random.default_rng([self.seed, SPLIT_IDS["train"], length, step, 1])
        samples = [make_mqar(rng, length, pairs) for _ in range(sequences)]
        tokens = torch.from_numpy(np.stack([x.tokens for x in samples]).astype(np.int64))
        mask = torch.from_numpy(np.stack([x.answer_mask for x in samples]))
        return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


class RecallDataModule(LightningDataModule):
    """Passkey / needle-in-a-haystack / MQAR at a training length, evaluated at several lengths.

    Args:
        task: ``passkey``, ``niah`` or ``mqar``.
        train_length: bytes per training (and validation) sequence.
        eval_lengths: one test DataLoader per length; ``nl-lightning test`` logs
            ``test/accuracy@<length>`` for each.
        num_train: training samples per epoch (generated on the fly; ``max_steps`` usually ends first).
        num_val: validation samples at ``train_length``.
        num_test: test samples per evaluation length.
        batch_size: training/validation batch size. ``eval_batch_size``: test batch size (long
            sequences: keep it small).
        seed: selects the generated data; splits use independent streams of the same seed.
        num_pairs, num_queries: MQAR key–value pairs per sequence and how many are queried
            (``None``: all).
        answer_digits: digits in the passkey / NIAH code.
        haystack_paths: NIAH haystack text (files, directories or globs); ``None``: the Python stdlib
            corpus that ``ByteLMDataModule`` builds (shared cache under ``data_dir``).
        corpus_max_bytes: cap on the haystack corpus size.
        min_distance: MQAR only: every key at least this many bytes before the queries (above an
            attention window, only a memory can answer).
        curriculum: MQAR only: training lengths in stages, ending at ``train_length`` (e.g.
            ``[32, 64, 128, 256]``), each stage but the last ``curriculum_steps`` optimizer steps
            long, with ``batch_size · train_length`` tokens per batch (:class:`CurriculumBatches`;
            ``num_pairs`` is capped at length / 8 and all are queried). Dense short sequences
            teach a memory to bind keys to values far sooner than long ones (docs/results.md).
    """

    vocab_size = 256

    def __init__(
        self,
        task: RecallTask = "passkey",
        train_length: int = 512,
        eval_lengths: list[int] | None = None,
        num_train: int = 100_000,
        num_val: int = 64,
        num_test: int = 32,
        batch_size: int = 16,
        eval_batch_size: int = 1,
        seed: int = 0,
        num_pairs: int = 8,
        num_queries: int | None = None,
        answer_digits: int = 5,
        haystack_paths: list[str] | None = None,
        data_dir: str = "data",
        corpus_max_bytes: int | None = 8_000_000,
        num_workers: int = 0,
        min_distance: int = 0,
        curriculum: list[int] | None = None,
        curriculum_steps: int = 100,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
        eval_lengths = [1024, 2048, 4096, 8192, 16384] if eval_lengths is None else list(eval_lengths)
        for name, value in (("train_length", train_length), ("num_train", num_train), ("num_val", num_val),
                            ("num_test", num_test), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("answer_digits", answer_digits)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if answer_digits < 3:
            raise ValueError(f"answer_digits must be at least 3 (a tenth of the codes is held out for evaluation), got {answer_digits}")
        if not eval_lengths or any(not isinstance(n, int) or n <= 1 for n in eval_lengths):
            raise ValueError(f"eval_lengths must be a non-empty list of integers > 1, got {eval_lengths!r}; e.g. [1024, 2048]")
        if curriculum is not None:
            if task != "mqar":
                raise ValueError(f"curriculum applies to task='mqar' only, got task={task!r}; remove curriculum")
            if not curriculum or curriculum[-1] != train_length or any(
                not isinstance(n, int) or n < 16 for n in curriculum
            ):
                raise ValueError(
                    f"curriculum must be lengths >= 16 ending at train_length={train_length}, got {curriculum!r}; "
                    f"e.g. [32, 64, {train_length}]"
                )
            if not isinstance(curriculum_steps, int) or curriculum_steps <= 0:
                raise ValueError(f"curriculum_steps must be a positive integer, got {curriculum_steps!r}")
        self.save_hyperparameters()
        self.min_distance, self.curriculum, self.curriculum_steps = min_distance, curriculum, curriculum_steps
        self.task, self.train_length, self.eval_lengths = task, train_length, sorted(set(eval_lengths))
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.num_pairs, self.num_queries, self.answer_digits = num_pairs, num_queries, answer_digits
        self.haystack_paths, self.data_dir, self.corpus_max_bytes = haystack_paths, Path(data_dir), corpus_max_bytes
        self.num_workers = num_workers
        self._corpus_dir: Path | None = None
        # Fail at construction, not mid-run, when a length cannot hold the task.
        for length in {train_length, *self.eval_lengths}:
            self._check_length(length)

    def _check_length(self, length: int) -> None:
        if self.task == "mqar":
            make_mqar(np.random.default_rng(0), length, self.num_pairs, self.num_queries, self.min_distance)
        elif self.task == "passkey":
            make_passkey(np.random.default_rng(0), length, self.answer_digits)
        else:
            make_niah(np.random.default_rng(0), length, np.zeros(length, dtype=np.uint8), self.answer_digits)

    # -- the haystack corpus (NIAH only) ------------------------------------------------------

    def _corpus_spec(self) -> CorpusSpec:
        files = stdlib_python_files() if self.haystack_paths is None else resolve_paths(list(self.haystack_paths))
        return CorpusSpec(tuple(files), 0.05, self.corpus_max_bytes)

    def prepare_data(self) -> None:
        if self.task == "niah":
            self._build_corpus()

    def _build_corpus(self) -> Path:
        if self._corpus_dir is None:
            spec = self._corpus_spec()
            # Same name and spec as ByteLMDataModule's default corpus, so the cache is shared.
            name = "stdlib" if self.haystack_paths is None else "user-" + spec.fingerprint[:8]
            self._corpus_dir = build_corpus(spec, self.data_dir / name)
        return self._corpus_dir

    def generator(self, split: str):
        """The ``(rng, length) -> RecallSample`` function for ``split`` (NIAH: haystack from that split's files)."""
        held_out = split != "train"
        if self.task == "passkey":
            return _Generator(make_passkey, digits=self.answer_digits, held_out=held_out)
        if self.task == "mqar":
            # One-byte keys and values leave no room to hold answers out; the random filler alone
            # makes a repeated sequence between independent streams vanishingly unlikely.
            return _Generator(make_mqar, num_pairs=self.num_pairs, num_queries=self.num_queries,
                              min_distance=self.min_distance)
        corpus_split = "train" if split == "train" else "val"
        return _Generator(make_niah, corpus_dir=self._build_corpus(), corpus_split=corpus_split,
                          digits=self.answer_digits, held_out=held_out)

    def dataset(self, split: str, length: int, num_samples: int) -> RecallDataset:
        return RecallDataset(self.generator(split), length, num_samples, self.seed, split)

    # -- Lightning hooks ----------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        if self.curriculum is not None:
            batches = CurriculumBatches(self.curriculum, self.curriculum_steps, self.batch_size * self.train_length,
                                        self.num_pairs, self.seed)
            return DataLoader(batches, batch_size=None, shuffle=False, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        return self._loader(self.dataset("train", self.train_length, self.num_train), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val", self.train_length, self.num_val), self.batch_size)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.dataset("test", n, self.num_test), self.eval_batch_size) for n in self.eval_lengths]

    def _loader(self, dataset: RecallDataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )


class _Generator:
    """A picklable ``(rng, length) -> RecallSample``; NIAH memory-maps its corpus split lazily per worker."""

    def __init__(self, make, corpus_dir: Path | None = None, corpus_split: str | None = None, **kwargs) -> None:
        self.make, self.kwargs = make, kwargs
        self.corpus_dir, self.corpus_split = corpus_dir, corpus_split
        self._corpus: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_corpus": None}

    def __call__(self, rng: np.random.Generator, length: int) -> RecallSample:
        if self.corpus_dir is None:
            return self.make(rng, length, **self.kwargs)
        if self._corpus is None:
            self._corpus = open_split(self.corpus_dir, self.corpus_split)
        return self.make(rng, length, self._corpus, **self.kwargs)
