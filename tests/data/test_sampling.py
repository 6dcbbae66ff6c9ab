"""nl_lightning/data/sampling.py: torch's random batches, resumable in the middle of an epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nl_lightning.data.sampling import ResumableRandomSampler

DATA = TensorDataset(torch.arange(103))


def epochs(loader: DataLoader, n: int = 3) -> list[torch.Tensor]:
    return [torch.cat([batch[0] for batch in loader]) for _ in range(n)]


@pytest.mark.parametrize("seed", [None, 7])
def test_it_draws_the_batches_and_rng_of_dataloader_shuffle(seed):
    def generator():
        return None if seed is None else torch.Generator().manual_seed(seed)

    torch.manual_seed(0)
    reference = epochs(DataLoader(DATA, batch_size=8, shuffle=True, generator=generator(), drop_last=True))
    after_reference = torch.rand(3)
    torch.manual_seed(0)
    g = generator()
    ours = epochs(DataLoader(DATA, batch_size=8, sampler=ResumableRandomSampler(len(DATA), g), generator=g, drop_last=True))
    assert all(torch.equal(a, b) for a, b in zip(reference, ours))
    assert torch.equal(torch.rand(3), after_reference)  # the global RNG advanced alike


@pytest.mark.parametrize("seed", [None, 7])
def test_resume_replays_the_epoch_from_where_it_stopped(seed):
    torch.manual_seed(0)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    sampler = ResumableRandomSampler(len(DATA), g)
    iterator = iter(sampler)
    seen = [next(iterator) for _ in range(40)]
    origin = sampler.origin
    rest = list(iterator)
    g2 = None if seed is None else torch.Generator().manual_seed(seed)
    again = ResumableRandomSampler(len(DATA), g2)
    again.resume(origin, 40)
    assert list(again) == rest and sorted(seen + rest) == list(range(103))
    torch.manual_seed(1)
    assert sorted(again) == list(range(103))  # the next epoch draws afresh
