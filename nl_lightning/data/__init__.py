"""LightningDataModules. Everything the defaults use is generated offline."""

from nl_lightning.data.byte_lm import ByteLMDataModule

__all__ = ["ByteLMDataModule"]
