"""A random sampler that a checkpoint can put back in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    """torch's ``RandomSampler`` (no replacement), plus the record of how each epoch's order was drawn.

    Every epoch draws its order exactly as ``RandomSampler`` does, from ``generator`` or, without one,
    from a seed taken off the global RNG, so batches are those of ``DataLoader(shuffle=True)``.
    ``origin`` says how the current epoch's order was drawn (the generator's state at the epoch's
    start, or the seed); ``resume(origin, skip)`` makes the next epoch draw that order again and
    start at sample ``skip``: a run restored from a checkpoint continues with the batches the
    uninterrupted run would have seen.
    """

    def __init__(self, size: int, generator: torch.Generator | None = None) -> None:
        self.size, self.generator = size, generator
        self.origin: torch.Tensor | int | None = None
        self._pending: tuple[torch.Tensor | int, int] | None = None

    def __len__(self) -> int:
        return self.size

    def resume(self, origin: torch.Tensor | int, skip: int) -> None:
        self._pending = (origin, skip)

    def __iter__(self) -> Iterator[int]:
        if self._pending is not None:
            origin, skip = self._pending
            self._pending = None
        elif self.generator is not None:
            origin, skip = self.generator.get_state(), 0
        else:
            origin, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.origin = origin
        if self.generator is not None:
            self.generator.set_state(origin)
            generator = self.generator
        else:
            generator = torch.Generator()
            generator.manual_seed(origin)
        yield from torch.randperm(self.size, generator=generator).tolist()[skip:]
        # RandomSampler draws one more (empty) permutation at the end of an epoch; so do we, so that a
        # shared generator advances as it would there.
        torch.randperm(self.size, generator=generator)
