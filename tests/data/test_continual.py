"""Task streams are deterministic per seed, disjoint where they must be, and reject bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nl_lightning.data.continual import (
    ContinualDataModule,
    TaskStream,
    build_stream,
    npz_stream,
    permuted_digits,
    rotated_digits,
    split_digits,
)


def _all_tensors(stream: TaskStream) -> list[torch.Tensor]:
    return [t for task in stream.tasks for ds in (task.train, task.test) for t in ds.tensors]


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


@pytest.mark.parametrize("kind, kwargs", [("permuted", {}), ("rotated", {}), ("split", {"scenario": "task"})])
def test_same_seed_gives_identical_tensors_and_other_seed_differs(kind, kwargs):
    a = build_stream(kind, num_tasks=3, seed=0, **kwargs)
    b = build_stream(kind, num_tasks=3, seed=0, **kwargs)
    c = build_stream(kind, num_tasks=3, seed=1, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(_all_tensors(a), _all_tensors(b)))
    assert not all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(_all_tensors(a), _all_tensors(c))
    )


def test_streams_have_documented_shapes_labels_and_scenarios():
    stream = permuted_digits(num_tasks=2)
    assert stream.scenario == "domain" and stream.num_classes == 10 and stream.input_shape == (1, 8, 8)
    x, y = stream.tasks[0].train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert split_digits(scenario="task").scenario == "task"
    assert split_digits().scenario == "class"


def test_train_and_test_examples_are_disjoint():
    task = permuted_digits(num_tasks=1).tasks[0]
    train, test = _rows(task.train.tensors[0]), _rows(task.test.tensors[0])
    # digits contains a few exact duplicate images; the split is by example, so at most those overlap
    assert len(train & test) <= 5
    assert len(task.train) + len(task.test) == 1797


def test_permuted_task0_is_identity_and_later_permutations_differ():
    stream = permuted_digits(num_tasks=3)
    plain = split_digits(num_tasks=1).tasks[0].train.tensors[0]  # same seed → same split, unpermuted
    xs = [task.train.tensors[0] for task in stream.tasks]
    assert torch.equal(xs[0], plain)
    assert not torch.equal(xs[1], xs[0]) and not torch.equal(xs[2], xs[1])
    # a permutation moves pixels, never changes them
    assert torch.equal(xs[1].flatten(1).sort(dim=1).values, xs[0].flatten(1).sort(dim=1).values)
    assert all(torch.equal(task.train.tensors[1], stream.tasks[0].train.tensors[1]) for task in stream.tasks)


def test_rotated_last_task_is_rotated_by_max_degrees():
    stream = rotated_digits(num_tasks=3, max_degrees=90.0)
    x0, x2 = stream.tasks[0].test.tensors[0], stream.tasks[2].test.tensors[0]
    assert torch.allclose(x2, torch.rot90(x0, 1, dims=(2, 3)), atol=1e-5)
    assert "45°" in stream.tasks[1].name


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_split_classes_are_disjoint_and_cover_all_digits(scenario):
    stream = split_digits(num_tasks=5, scenario=scenario)
    assert [task.classes for task in stream.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for task in stream.tasks:
        for ds in (task.train, task.test):
            assert set(ds.tensors[1].tolist()) == set(task.classes)


def test_split_accepts_explicit_class_splits():
    stream = split_digits(class_splits=[[9, 0], [3]])
    assert [task.classes for task in stream.tasks] == [(9, 0), (3,)]
    assert set(stream.tasks[0].test.tensors[1].tolist()) == {0, 9}


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: permuted_digits(num_tasks=0), "num_tasks must be a positive integer"),
        (lambda: rotated_digits(num_tasks=2.5), "num_tasks must be a positive integer"),
        (lambda: split_digits(num_tasks=11), "num_tasks=11 is more than the number of classes"),
        (lambda: split_digits(class_splits=[[0, 1], [1, 2]]), r"repeat classes \[1\]"),
        (lambda: split_digits(class_splits=[[0], []]), "non-empty"),
        (lambda: split_digits(class_splits=[[0], [12]]), r"classes \[12\] that have no examples"),
        (lambda: split_digits(scenario="domain"), "scenario 'task' or 'class'"),
        (lambda: permuted_digits(test_fraction=1.0), "test_fraction"),
        (lambda: build_stream("mnist"), "unknown stream 'mnist'"),
    ],
)
def test_bad_inputs_raise_naming_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _write_npz(path, with_tasks: bool):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.random((40, 3)).astype(np.float32), y_train=np.arange(40) % 4,
        x_test=rng.random((12, 3)).astype(np.float32), y_test=np.arange(12) % 4,
    )
    if with_tasks:
        arrays.update(task_train=np.arange(40) // 20, task_test=np.arange(12) // 6)
    np.savez(path, **arrays)
    return arrays


def test_npz_stream_with_task_ids(tmp_path):
    arrays = _write_npz(tmp_path / "s.npz", with_tasks=True)
    stream = npz_stream(tmp_path / "s.npz")
    assert stream.name == "npz" and stream.scenario == "domain" and stream.num_tasks == 2
    assert stream.num_classes == 4 and stream.input_shape == (3,)
    assert torch.equal(stream.tasks[1].train.tensors[0], torch.from_numpy(arrays["x_train"][20:]))
    assert stream.tasks[0].classes == (0, 1, 2, 3)


def test_npz_stream_split_by_classes(tmp_path):
    _write_npz(tmp_path / "s.npz", with_tasks=False)
    stream = npz_stream(tmp_path / "s.npz", scenario="task", num_tasks=2)
    assert [task.classes for task in stream.tasks] == [(0, 1), (2, 3)]
    assert set(stream.tasks[1].test.tensors[1].tolist()) == {2, 3}


def test_npz_stream_rejects_bad_files(tmp_path):
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 3)), y_train=np.zeros(2))
    with pytest.raises(ValueError, match=r"lacks arrays \['x_test', 'y_test'\]"):
        npz_stream(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        npz_stream(tmp_path / "missing.npz")
    _write_npz(tmp_path / "s.npz", with_tasks=False)
    with pytest.raises(ValueError, match="needs task_train/task_test"):
        npz_stream(tmp_path / "s.npz", scenario="domain")


class _FakeTrainer:
    current_epoch = 0


def test_datamodule_serves_task_by_epoch_and_all_tasks_for_validation():
    dm = ContinualDataModule(stream="split", num_tasks=3, epochs_per_task=2, batch_size=32)
    dm.setup("fit")
    trainer = _FakeTrainer()
    dm.trainer = trainer
    for epoch, task in [(0, 0), (1, 0), (2, 1), (5, 2)]:
        trainer.current_epoch = epoch
        assert dm.current_task == task
        labels = torch.cat([y for _, y in dm.train_dataloader()])
        assert set(labels.tolist()) == set(dm.stream.tasks[task].classes)
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    assert [set(torch.cat([y for _, y in dl]).tolist()) for dl in loaders] == [{0, 1, 2, 3}, {4, 5, 6}, {7, 8, 9}]  # uneven: extras go first
    trainer.current_epoch = 6
    with pytest.raises(RuntimeError, match="max_epochs=6"):
        dm.train_dataloader()


def test_joint_stream_draws_every_task_with_its_id_and_one_tasks_worth_per_epoch():
    dm = ContinualDataModule(stream="split", num_tasks=3, epochs_per_task=2, batch_size=32, joint=True)
    dm.setup("fit")
    dm.trainer = _FakeTrainer()
    dm.trainer.current_epoch = 0
    batches = list(dm.train_dataloader())
    x, y, task_ids = (torch.cat(parts) for parts in zip(*batches))
    assert len(y) == len(dm.stream.tasks[0].train)  # the sequential stream's steps per epoch
    assert set(task_ids.tolist()) == {0, 1, 2}  # all tasks at once
    for t, task in enumerate(dm.stream.tasks):  # every example carries its own task's id
        assert set(y[task_ids == t].tolist()) <= set(task.classes)
    dm.trainer.current_epoch = 1
    assert not torch.equal(torch.cat([b[1] for b in dm.train_dataloader()]), y)  # a new draw each epoch


def test_datamodule_rejects_bad_configs():
    with pytest.raises(ValueError, match="npz_path"):
        ContinualDataModule(stream="npz")
    with pytest.raises(ValueError, match="unknown stream"):
        ContinualDataModule(stream="cifar")
    with pytest.raises(ValueError, match="domain-incremental"):
        ContinualDataModule(stream="permuted", scenario="class").setup()
