"""Optimizers (plain PyTorch, no Lightning import): every one is a closure-compatible ``torch.optim.Optimizer``."""

from nl_lightning.optim.dgd import DGD
from nl_lightning.optim.dmgd import DMGD, DeepMomentum
from nl_lightning.optim.inner_rules import InnerRule, MomentumSGD
from nl_lightning.optim.level_aware import (
    LevelAwareAdamW,
    LevelAwareOptimizer,
    LevelAwareSGD,
    LevelSchedule,
    make_level_aware,
)
from nl_lightning.optim.m3 import M3
from nl_lightning.optim.muon import Muon
from nl_lightning.optim.nested import NestedOptimizer
from nl_lightning.optim.presets import PRESETS as NESTED_PRESETS

__all__ = [
    "DGD",
    "DMGD",
    "DeepMomentum",
    "InnerRule",
    "LevelAwareAdamW",
    "LevelAwareOptimizer",
    "LevelAwareSGD",
    "LevelSchedule",
    "M3",
    "MomentumSGD",
    "Muon",
    "NESTED_PRESETS",
    "NestedOptimizer",
    "make_level_aware",
]
