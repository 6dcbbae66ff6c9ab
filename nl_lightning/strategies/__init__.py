"""Training strategies (SPEC §7).

``AtomicDeepSpeedStrategy`` (GPUs; crash-safe checkpoint directories) and
``CPUDeepSpeedStrategy`` (DeepSpeed on CPU processes, for tests and smoke runs). The latter is
imported only when asked for: its module sets ``DS_ACCELERATOR=cpu``, which must not happen on a
GPU machine that only wanted the former.
"""

from nl_lightning.strategies.atomic_deepspeed import AtomicDeepSpeedStrategy

__all__ = ["AtomicDeepSpeedStrategy", "CPUDeepSpeedStrategy"]


def __getattr__(name: str):
    if name == "CPUDeepSpeedStrategy":
        from nl_lightning.strategies.cpu_deepspeed import CPUDeepSpeedStrategy

        return CPUDeepSpeedStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
