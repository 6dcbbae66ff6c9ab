"""Optimizers (plain PyTorch, no Lightning import): every one is a closure-compatible ``torch.optim.Optimizer``."""

from nl_lightning.optim.level_aware import (
    LevelAwareAdamW,
    LevelAwareOptimizer,
    LevelAwareSGD,
    LevelSchedule,
    make_level_aware,
)
from nl_lightning.optim.nested import InnerRule, MomentumSGD, NestedOptimizer
from nl_lightning.optim.presets import PRESETS as NESTED_PRESETS

__all__ = [
    "InnerRule",
    "LevelAwareAdamW",
    "LevelAwareOptimizer",
    "LevelAwareSGD",
    "LevelSchedule",
    "MomentumSGD",
    "NESTED_PRESETS",
    "NestedOptimizer",
    "make_level_aware",
]
