"""Small image classifiers for continual learning (plain PyTorch): MLP, CNN, and an MLP of CMS levels.

Every classifier maps ``(B, *input_shape)`` float inputs to ``(B, num_classes)`` logits over the
GLOBAL label space of a task stream; task-incremental masking happens in the LightningModule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nl_lightning.models.cms import ContinuumMemory
from nl_lightning.models.layers import RMSNorm


def _check_shape(input_shape: Sequence[int], num_classes: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes such as (1, 8, 8), got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return shape


class MLPClassifier(nn.Module):
    """Flatten → [Linear → ReLU] × len(hidden) → Linear, the usual permuted-MNIST network."""

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10,
                 hidden: Sequence[int] = (100, 100)) -> None:
        super().__init__()
        self.input_shape = _check_shape(input_shape, num_classes)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {list(hidden)}")
        sizes = [int(torch.tensor(self.input_shape).prod()), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNNClassifier(nn.Module):
    """Two 3×3 conv blocks (the second strided) → global average pool → Linear.

    Sized for 8×8 digits; any ``(C, H, W)`` input with H, W ≥ 2 works.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10,
                 channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        self.input_shape = _check_shape(input_shape, num_classes)
        if len(self.input_shape) != 3:
            raise ValueError(
                f"CNNClassifier needs (channels, height, width) inputs, got input_shape {self.input_shape}"
            )
        if len(channels) != 2 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be two positive sizes, got {list(channels)}")
        c_in, (c1, c2) = self.input_shape[0], channels
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CMSClassifier(nn.Module):
    """HOPE-style Continuum Memory System as a classifier: embed → CMS levels → norm → head.

    The CMS levels are HOPE's (``nl_lightning.models.cms.ContinuumMemory``: pre-norm residual
    SwiGLU MLPs, fastest first). ``param_groups()`` gives each level its own group carrying
    ``period``, so ``NestedScheduler(levels=None)`` updates level ℓ only every ``periods[ℓ]``
    optimizer steps with its summed gradient; the embedding and the head form the ``backbone``
    group (period 1). Slow levels change rarely, which is the hypothesis for retention.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, dim: int = 64,
                 hidden: int = 128, periods: Sequence[int] = (1, 4, 16)) -> None:
        super().__init__()
        self.input_shape = _check_shape(input_shape, num_classes)
        if not periods or any(not isinstance(p, int) or p < 1 for p in periods):
            raise ValueError(f"periods must be positive integers, one per CMS level, got {list(periods)}")
        self.periods = tuple(periods)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(self.input_shape).prod()), dim))
        self.cms = ContinuumMemory(dim, hidden, self.periods)
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.cms(self.embed(x))))

    def param_groups(self) -> list[dict]:
        """The backbone (period 1) and one group per CMS level with ``period``, ``level`` and ``name``."""
        in_cms = {id(p) for p in self.cms.parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in in_cms], "name": "backbone",
                   "period": 1, "level": 0}]
        for i, (level, period) in enumerate(zip(self.cms.levels, self.periods)):
            groups.append({"params": list(level.parameters()), "name": f"cms.{i}", "period": period, "level": i})
        return groups
