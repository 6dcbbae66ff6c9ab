"""Lightning callbacks of nl_lightning, importable as ``nl_lightning.callbacks``.

The source lives in the repository's top-level ``callbacks/`` folder and is mapped into the
package by setuptools ``package-dir`` (SPEC §1). Callbacks here may import ``nl_lightning.optim``
but nothing from ``nl_lightning.cli``.
"""

from nl_lightning.callbacks.continual import ContinualStrategy
from nl_lightning.callbacks.dgd_inputs import DGDInputCapture
from nl_lightning.callbacks.ewc import EWC
from nl_lightning.callbacks.nested_scheduler import NestedScheduler
from nl_lightning.callbacks.preemption import PreemptionCheckpoint
from nl_lightning.callbacks.replay import ExperienceReplay, ReservoirBuffer
from nl_lightning.callbacks.synaptic_intelligence import SynapticIntelligence
from nl_lightning.callbacks.tensorboard_hint import TensorBoardHint

__all__ = [
    "ContinualStrategy",
    "DGDInputCapture",
    "EWC",
    "ExperienceReplay",
    "NestedScheduler",
    "PreemptionCheckpoint",
    "ReservoirBuffer",
    "SynapticIntelligence",
    "TensorBoardHint",
]
