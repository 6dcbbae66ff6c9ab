"""Experience replay from a reservoir-sampled memory (Chaudhry et al. 2019, "tiny episodic memories")."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from nl_lightning.callbacks.continual import ContinualStrategy


class ReservoirBuffer:
    """A fixed-size uniform sample of everything ever added (Vitter's Algorithm R).

    The n-th example added (counting from 0) is stored at once while the buffer has room;
    afterwards it replaces a uniformly chosen slot with probability ``capacity / (n + 1)``. After
    N additions every example is in the buffer with probability ``capacity / N``, whatever the
    task it came from, so the memory stays balanced across tasks without knowing their number.

    Examples are kept on the CPU as ``(x, y, task)``; the random draws come from a private
    ``torch.Generator`` whose state is part of ``state_dict()``, so a resumed run draws the same.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"buffer capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.x: Tensor | None = None
        self.y = torch.empty(0, dtype=torch.long)
        self.task = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: Tensor, y: Tensor, task: Tensor) -> None:
        x, y, task = x.detach().cpu(), y.detach().cpu(), task.detach().cpu()
        if self.x is None:
            self.x = torch.empty(self.capacity, *x.shape[1:], dtype=x.dtype)
            self.y = torch.empty(self.capacity, dtype=y.dtype)
            self.task = torch.empty(self.capacity, dtype=task.dtype)
        elif x.shape[1:] != self.x.shape[1:]:
            raise ValueError(
                f"replay buffer holds examples of shape {tuple(self.x.shape[1:])}, got {tuple(x.shape[1:])}"
            )
        counts = torch.arange(self.seen, self.seen + len(y))  # n of each new example
        # Slot j ~ U{0, …, n}; the example is kept iff j < capacity (always while there is room).
        slots = (torch.rand(len(y), generator=self.generator, dtype=torch.float64) * (counts + 1)).long()
        slots = torch.where(counts < self.capacity, counts, slots)
        for i in torch.nonzero(slots < self.capacity).flatten().tolist():  # in order: a later example wins
            slot = int(slots[i])
            self.x[slot], self.y[slot], self.task[slot] = x[i], y[i], task[i]
        self.seen += len(y)

    def sample(self, size: int) -> tuple[Tensor, Tensor, Tensor]:
        """``size`` distinct stored examples (all of them if fewer), uniformly at random."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer; add examples first")
        index = torch.randperm(len(self), generator=self.generator)[:size]
        return self.x[index], self.y[index], self.task[index]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seen": self.seen, "generator": self.generator.get_state(),
                "x": self.x, "y": self.y, "task": self.task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["capacity"] != self.capacity:
            raise ValueError(
                f"the checkpoint's replay buffer has capacity {state_dict['capacity']}, this one {self.capacity}; "
                "resume with the same buffer_size"
            )
        self.seen = state_dict["seen"]
        self.generator.set_state(state_dict["generator"])
        self.x, self.y, self.task = state_dict["x"], state_dict["y"], state_dict["task"]


class ExperienceReplay(ContinualStrategy):
    """Train every batch together with examples replayed from a reservoir memory of earlier batches.

    In ``transform_batch`` it draws ``replay_batch_size`` stored examples (default: as many as
    the incoming batch), appends them to the batch — each keeps its own task id, so
    task-incremental masking applies per example — and then adds the incoming examples to the
    memory (after drawing, so an example is never replayed in the batch that brought it).

    Args:
        buffer_size: examples kept in memory (over all tasks).
        replay_batch_size: examples replayed per batch; None = the incoming batch size.
        seed: seed of the memory's own random generator (insertion and sampling).
    """

    def __init__(self, buffer_size: int = 200, replay_batch_size: int | None = None, seed: int = 0) -> None:
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(
                f"replay_batch_size must be positive or None (= the batch size), got {replay_batch_size!r}"
            )
        self.buffer = ReservoirBuffer(buffer_size, seed)
        self.replay_batch_size = replay_batch_size

    def transform_batch(self, batch: tuple[Tensor, Tensor, Tensor], pl_module: LightningModule):
        x, y, task = batch
        if len(self.buffer) > 0:
            old_x, old_y, old_task = self.buffer.sample(self.replay_batch_size or len(y))
            batch = (torch.cat([x, old_x.to(x.device, x.dtype)]), torch.cat([y, old_y.to(y.device)]),
                     torch.cat([task, old_task.to(task.device)]))
        self.buffer.add(x, y, task)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state_dict["buffer"])
