"""nl_lightning: Nested Learning (HOPE, Titans, CMS, multi-timescale optimizers) on PyTorch Lightning."""

__version__ = "0.1.0"
