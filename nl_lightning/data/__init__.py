"""LightningDataModules. Everything the defaults use is generated offline."""

from nl_lightning.data.byte_lm import ByteLMDataModule
from nl_lightning.data.longctx import RecallDataModule
from nl_lightning.data.continual import ContinualDataModule, Task, TaskStream, build_stream

__all__ = ["ByteLMDataModule", "ContinualDataModule", "RecallDataModule", "Task", "TaskStream", "build_stream"]
