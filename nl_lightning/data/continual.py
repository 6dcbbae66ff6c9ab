"""Continual-learning task streams and the DataModule that serves them one task at a time.

Streams (SPEC §6) are built from scikit-learn's bundled digits (1,797 8×8 images, offline) or
from user arrays in a ``.npz`` file. Every stream is a deterministic function of its arguments:
the seed picks the train/test split and the per-task transforms, so two calls with the same
seed return identical tensors.

- ``permuted``: task t applies a fixed pixel permutation to every image. Task 0 is the identity
  (the unpermuted digits) — the usual convention, so the first task is the plain dataset.
- ``rotated``: task t rotates every image by ``t · max_degrees / (num_tasks − 1)`` degrees
  (task 0 unrotated); the seed picks the split only.
- ``split``: the 10 classes are divided into ``num_tasks`` disjoint groups (e.g. [0, 1], [2, 3],
  …). ``scenario="task"`` means the model is told the task (logits masked to its classes);
  ``scenario="class"`` means it must tell all classes seen so far apart.
- ``npz``: user arrays, layout documented in :func:`npz_stream`.

Labels are always the GLOBAL class labels (0–9 for digits); the classifier has ``num_classes``
outputs and the task-incremental mask comes from ``Task.classes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler, TensorDataset

STREAMS = ("permuted", "rotated", "split", "npz")
SCENARIOS = ("domain", "task", "class")


@dataclass(frozen=True)
class Task:
    """One task: train/test sets of ``(x float32, y int64 global label)`` and the labels it uses."""

    name: str
    train: TensorDataset
    test: TensorDataset
    classes: tuple[int, ...]


@dataclass(frozen=True)
class TaskStream:
    """An ordered sequence of tasks and what a classifier needs to know to learn it."""

    name: str
    scenario: str
    tasks: tuple[Task, ...]
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


def _check_num_tasks(num_tasks, upper: int | None = None, what: str = "") -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    if upper is not None and num_tasks > upper:
        raise ValueError(f"num_tasks={num_tasks} is more than {what} ({upper}); use num_tasks <= {upper}")


def _check_test_fraction(test_fraction) -> None:
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``(N, 1, 8, 8)`` float32 in [0, 1] and int64 labels (sklearn ships them; no download)."""
    from sklearn.datasets import load_digits  # dev dependency; imported lazily so the package imports without it

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    return x, torch.from_numpy(bunch.target.astype(np.int64))


def _stratified_split(y: torch.Tensor, test_fraction: float, generator: torch.Generator):
    """Train/test indices, disjoint, with ``test_fraction`` of every class held out."""
    train, test = [], []
    for label in torch.unique(y).tolist():
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = max(1, round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def _split_digits_seeded(seed: int, test_fraction: float):
    _check_test_fraction(test_fraction)
    x, y = _digits()
    generator = torch.Generator().manual_seed(seed)
    train_idx, test_idx = _stratified_split(y, test_fraction, generator)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], generator


def permuted_digits(num_tasks: int = 5, seed: int = 0, test_fraction: float = 0.25) -> TaskStream:
    """Domain-incremental digits: task t permutes the 64 pixels with its own fixed permutation.

    Task 0 is the identity permutation; tasks 1… draw theirs from ``seed``.
    """
    _check_num_tasks(num_tasks)
    x_tr, y_tr, x_te, y_te, generator = _split_digits_seeded(seed, test_fraction)
    n_pixels = x_tr[0].numel()
    classes = tuple(range(10))
    tasks = []
    for t in range(num_tasks):
        perm = torch.arange(n_pixels) if t == 0 else torch.randperm(n_pixels, generator=generator)

        def permute(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, perm].reshape(x.shape)

        tasks.append(Task(f"permuted-{t}", TensorDataset(permute(x_tr), y_tr), TensorDataset(permute(x_te), y_te), classes))
    return TaskStream("permuted", "domain", tuple(tasks), 10, tuple(x_tr.shape[1:]))


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``(N, C, H, W)`` images about their centre (bilinear, zero padding)."""
    if degrees == 0:
        return x.clone()
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0.0, 1.0)


def rotated_digits(
    num_tasks: int = 5, seed: int = 0, max_degrees: float = 90.0, test_fraction: float = 0.25
) -> TaskStream:
    """Domain-incremental digits: task t rotates every image by ``t · max_degrees / (num_tasks − 1)``."""
    _check_num_tasks(num_tasks)
    if not 0.0 < float(max_degrees) <= 360.0:
        raise ValueError(f"max_degrees must be in (0, 360], got {max_degrees!r}")
    x_tr, y_tr, x_te, y_te, _ = _split_digits_seeded(seed, test_fraction)
    step = max_degrees / (num_tasks - 1) if num_tasks > 1 else 0.0
    classes = tuple(range(10))
    tasks = []
    for t in range(num_tasks):
        angle = t * step
        tasks.append(
            Task(f"rotated-{t} ({angle:g}°)", TensorDataset(_rotate(x_tr, angle), y_tr),
                 TensorDataset(_rotate(x_te, angle), y_te), classes)
        )
    return TaskStream("rotated", "domain", tuple(tasks), 10, tuple(x_tr.shape[1:]))


def _class_groups(num_tasks: int, num_classes: int, class_splits: Sequence[Sequence[int]] | None, labels: set[int]):
    """The classes of each task: ``class_splits`` validated, or ``range(num_classes)`` cut into near-equal groups."""
    if class_splits is None:
        _check_num_tasks(num_tasks, num_classes, "the number of classes")
        return [tuple(int(c) for c in group) for group in np.array_split(np.arange(num_classes), num_tasks)]
    groups = [tuple(int(c) for c in group) for group in class_splits]
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError(f"class_splits {class_splits!r} must be a non-empty list of non-empty class lists")
    flat = [c for g in groups for c in g]
    if len(flat) != len(set(flat)):
        dup = sorted({c for c in flat if flat.count(c) > 1})
        raise ValueError(f"class_splits {class_splits!r} repeat classes {dup}; each class may belong to one task only")
    missing = sorted(set(flat) - labels)
    if missing:
        raise ValueError(f"class_splits {class_splits!r} name classes {missing} that have no examples; use labels from {sorted(labels)}")
    return groups


def _tasks_by_class(prefix: str, groups, x_tr, y_tr, x_te, y_te) -> tuple[Task, ...]:
    tasks = []
    for t, group in enumerate(groups):
        tr = torch.isin(y_tr, torch.tensor(group))
        te = torch.isin(y_te, torch.tensor(group))
        tasks.append(Task(f"{prefix}-{t} {list(group)}", TensorDataset(x_tr[tr], y_tr[tr]), TensorDataset(x_te[te], y_te[te]), group))
    return tuple(tasks)


def split_digits(
    num_tasks: int = 5,
    scenario: str = "class",
    seed: int = 0,
    test_fraction: float = 0.25,
    class_splits: Sequence[Sequence[int]] | None = None,
) -> TaskStream:
    """Digits split into tasks of disjoint classes (default [0, 1], [2, 3], … for 5 tasks).

    ``scenario="task"`` (task-incremental: logits masked to the task's classes) or ``"class"``
    (class-incremental). ``class_splits`` overrides the grouping (then ``num_tasks`` is ignored).
    """
    if scenario not in ("task", "class"):
        raise ValueError(f"split streams need scenario 'task' or 'class', got {scenario!r}")
    x_tr, y_tr, x_te, y_te, _ = _split_digits_seeded(seed, test_fraction)
    groups = _class_groups(num_tasks, 10, class_splits, set(range(10)))
    return TaskStream("split", scenario, _tasks_by_class("split", groups, x_tr, y_tr, x_te, y_te), 10, tuple(x_tr.shape[1:]))


def npz_stream(
    path: str | Path,
    scenario: str = "domain",
    num_tasks: int | None = None,
    class_splits: Sequence[Sequence[int]] | None = None,
    num_classes: int | None = None,
) -> TaskStream:
    """A stream from user arrays in a ``.npz`` file.

    Required arrays: ``x_train`` (N, ...) float, ``y_train`` (N,) int labels in [0, num_classes),
    ``x_test``, ``y_test`` likewise. Tasks come from, in order of precedence:

    1. ``task_train`` / ``task_test`` arrays (N,) of task ids 0…T−1 (every id present in both) —
       any scenario; each task's ``classes`` are the labels that occur in it;
    2. otherwise the labels are cut into tasks of disjoint classes (``class_splits`` or
       ``num_tasks`` near-equal groups) — scenarios "task"/"class".

    ``x`` is used as given (cast to float32); scale it yourself.
    """
    path = Path(path)
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    if not path.is_file():
        raise FileNotFoundError(f"npz stream file {str(path)!r} does not exist; pass npz_path=<file written by numpy.savez>")
    with np.load(path) as arrays:
        data = {key: arrays[key] for key in arrays.files}
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
    if missing:
        raise ValueError(f"{path} lacks arrays {missing}; it has {sorted(data)} (see npz_stream's docstring for the layout)")
    x_tr, x_te = (torch.as_tensor(data[k], dtype=torch.float32) for k in ("x_train", "x_test"))
    y_tr, y_te = (torch.as_tensor(data[k]).long() for k in ("y_train", "y_test"))
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"{path}: x_{split} has {len(x)} rows but y_{split} has shape {tuple(y.shape)}; need (N,) labels, N ≥ 1")
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"{path}: x_{split} has non-finite values (NaN or inf) in {len(rows)} rows, e.g. {rows[:5]}; "
                             "they would reach the weights as NaN: drop or clean those rows (e.g. numpy.nan_to_num) first")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(f"{path}: x_train rows {tuple(x_tr.shape[1:])} and x_test rows {tuple(x_te.shape[1:])} differ")
    labels = set(torch.cat([y_tr, y_te]).tolist())
    inferred = max(labels) + 1
    num_classes = inferred if num_classes is None else num_classes
    if min(labels) < 0 or inferred > num_classes:
        raise ValueError(f"{path}: labels span [{min(labels)}, {max(labels)}] but num_classes={num_classes}; labels must be in [0, num_classes)")

    if "task_train" in data or "task_test" in data:
        if "task_train" not in data or "task_test" not in data:
            raise ValueError(f"{path}: give both task_train and task_test (or neither)")
        t_tr, t_te = torch.as_tensor(data["task_train"]).long(), torch.as_tensor(data["task_test"]).long()
        if t_tr.shape != y_tr.shape or t_te.shape != y_te.shape:
            raise ValueError(f"{path}: task_train/task_test must have one id per row, like y_train/y_test")
        ids = sorted(set(t_tr.tolist()))
        if ids != list(range(len(ids))) or sorted(set(t_te.tolist())) != ids:
            raise ValueError(f"{path}: task ids must be 0…T−1 and each must appear in both train and test; got train {ids}")
        tasks = []
        for t in ids:
            tr, te = t_tr == t, t_te == t
            classes = tuple(sorted(set(y_tr[tr].tolist()) | set(y_te[te].tolist())))
            tasks.append(Task(f"npz-{t}", TensorDataset(x_tr[tr], y_tr[tr]), TensorDataset(x_te[te], y_te[te]), classes))
        return TaskStream("npz", scenario, tuple(tasks), num_classes, tuple(x_tr.shape[1:]))

    if scenario == "domain":
        raise ValueError(f"{path}: a 'domain' stream needs task_train/task_test arrays; without them use scenario 'task' or 'class'")
    if class_splits is None and num_tasks is None:
        raise ValueError(f"{path} has no task arrays; pass num_tasks or class_splits to cut its classes into tasks")
    groups = _class_groups(num_tasks, num_classes, class_splits, labels)
    tasks = _tasks_by_class("npz", groups, x_tr, y_tr, x_te, y_te)
    empty = [task.name for task in tasks if len(task.train) == 0 or len(task.test) == 0]
    if empty:
        raise ValueError(f"{path}: tasks {empty} have no train or test examples; choose class_splits from labels {sorted(labels)}")
    return TaskStream("npz", scenario, tasks, num_classes, tuple(x_tr.shape[1:]))


def build_stream(kind: str, **kwargs) -> TaskStream:
    """Dispatch by name: ``permuted``, ``rotated``, ``split`` or ``npz`` (kwargs go to the builder)."""
    builders = {"permuted": permuted_digits, "rotated": rotated_digits, "split": split_digits, "npz": npz_stream}
    if kind not in builders:
        raise ValueError(f"unknown stream {kind!r}; choose one of {list(builders)}")
    return builders[kind](**kwargs)


class ContinualDataModule(LightningDataModule):
    """Serves a :class:`TaskStream` to ONE ``Trainer.fit`` that walks through the tasks.

    Run it with ``max_epochs = num_tasks * epochs_per_task`` and
    ``reload_dataloaders_every_n_epochs=1``: epoch e trains on task ``e // epochs_per_task``
    (``self.current_task``). Validation and test return one loader per task, ALL tasks in order
    (dataloader_idx j == task j); the LightningModule decides which tasks count as seen.

    Args:
        stream: ``permuted`` | ``rotated`` | ``split`` | ``npz``.
        scenario: for ``split``/``npz``: ``task`` or ``class`` (``domain`` for npz with task ids);
            None picks ``class`` for split and ``domain`` for npz.
        npz_path: the arrays file for ``stream="npz"``.
        class_splits: explicit class groups for ``split``/``npz``.
        max_degrees: the last task's rotation for ``rotated``.
        eval_batch_size: batch size of the validation/test loaders (evaluation has no gradient,
            so large batches only save time); None uses ``batch_size``.
        joint: the upper bound of a stream: every epoch trains on all tasks at once (as many
            examples per epoch as one task has, drawn from the union, so the run has the
            sequential stream's steps); batches carry each example's task id.
    """

    def __init__(
        self,
        stream: str = "permuted",
        num_tasks: int = 5,
        seed: int = 0,
        batch_size: int = 64,
        epochs_per_task: int = 1,
        npz_path: str | None = None,
        num_workers: int = 0,
        scenario: str | None = None,
        test_fraction: float = 0.25,
        class_splits: list[list[int]] | None = None,
        max_degrees: float = 90.0,
        eval_batch_size: int | None = 512,
        joint: bool = False,
    ) -> None:
        super().__init__()
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; choose one of {list(STREAMS)}")
        if stream == "npz" and npz_path is None:
            raise ValueError("stream='npz' needs npz_path=<file.npz> (layout: see nl_lightning.data.continual.npz_stream)")
        if not isinstance(epochs_per_task, int) or epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be a positive integer, got {epochs_per_task!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.stream: TaskStream | None = None

    def _build(self) -> TaskStream:
        hp = self.hparams
        if hp.stream == "npz":
            return npz_stream(hp.npz_path, scenario=hp.scenario or "domain", num_tasks=hp.num_tasks, class_splits=hp.class_splits)
        if hp.stream == "split":
            return split_digits(hp.num_tasks, hp.scenario or "class", hp.seed, hp.test_fraction, hp.class_splits)
        if hp.scenario not in (None, "domain"):
            raise ValueError(f"stream {hp.stream!r} is domain-incremental; drop scenario={hp.scenario!r} or use stream='split'")
        if hp.stream == "rotated":
            return rotated_digits(hp.num_tasks, hp.seed, hp.max_degrees, hp.test_fraction)
        return permuted_digits(hp.num_tasks, hp.seed, hp.test_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.stream is None:
            self.stream = self._build()

    @property
    def num_tasks(self) -> int:
        return self.stream.num_tasks if self.stream is not None else self.hparams.num_tasks

    @property
    def current_task(self) -> int:
        """The task the current epoch trains on (0 before a Trainer is attached)."""
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        task = epoch // self.hparams.epochs_per_task
        if task >= self.num_tasks:
            raise RuntimeError(
                f"epoch {epoch} is past the last task ({self.num_tasks} tasks × {self.hparams.epochs_per_task} epochs); "
                f"set Trainer(max_epochs={self.num_tasks * self.hparams.epochs_per_task})"
            )
        return task

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        batch_size = self.hparams.batch_size if shuffle else (self.hparams.eval_batch_size or self.hparams.batch_size)
        # A generator seeded by (seed, epoch) makes the batch order of every epoch reproducible
        # without repeating one order in all epochs (loaders are rebuilt each epoch).
        generator = None
        if shuffle:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            generator = torch.Generator().manual_seed(self.hparams.seed * 100_003 + epoch)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.hparams.num_workers)

    def _require_stream(self) -> TaskStream:
        if self.stream is None:
            self.setup()
        return self.stream

    def train_dataloader(self) -> DataLoader:
        stream = self._require_stream()
        if not self.hparams.joint:
            return self._loader(stream.tasks[self.current_task].train, shuffle=True)
        union = ConcatDataset([
            TensorDataset(*task.train.tensors, torch.full((len(task.train),), t, dtype=torch.long))
            for t, task in enumerate(stream.tasks)
        ])
        per_epoch = len(stream.tasks[self.current_task].train)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(self.hparams.seed * 100_003 + epoch)
        sampler = RandomSampler(union, num_samples=per_epoch, generator=generator)
        return DataLoader(union, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(task.test, shuffle=False) for task in self._require_stream().tasks]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
