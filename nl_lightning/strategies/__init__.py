"""Training strategies (SPEC §7)."""

from nl_lightning.strategies.cpu_deepspeed import CPUDeepSpeedStrategy

__all__ = ["CPUDeepSpeedStrategy"]
