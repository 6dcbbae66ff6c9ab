"""DeepSpeed ZeRO 1/2/3 on CPU processes (gloo), for tests and smoke runs without a GPU (SPEC §7).

DeepSpeed picks its accelerator the first time ``deepspeed.accelerator.get_accelerator()`` runs,
from ``DS_ACCELERATOR``. Importing this module does ``os.environ.setdefault("DS_ACCELERATOR", "cpu")``
(and so does the constructor), which is early enough as long as nothing has asked DeepSpeed for its
accelerator yet in this process; an explicit ``DS_ACCELERATOR`` is left alone. Lightning's launcher
copies the environment into the worker processes it starts.

Usage::

    Trainer(accelerator="cpu", devices=2, precision=32, strategy=CPUDeepSpeedStrategy(stage=2))
    nl-lightning fit ... --trainer.strategy=nl_lightning.strategies.CPUDeepSpeedStrategy \\
        --trainer.accelerator=cpu --trainer.devices=2 --trainer.precision=32

Only training (``fit``) is covered; ``validate``/``test`` without ``fit`` take Lightning's
inference path, which still reads a CUDA device index.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402

from nl_lightning.strategies.atomic_deepspeed import AtomicDeepSpeedStrategy  # noqa: E402


class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with the three CUDA assumptions taken out (and, as
    ``AtomicDeepSpeedStrategy``, crash-safe checkpoint directories).

    Takes the same arguments as ``DeepSpeedStrategy`` (``stage=1|2|3``, ``config=...``);
    ``process_group_backend`` defaults to ``"gloo"``.
    """

    def __init__(self, *args, process_group_backend: str | None = "gloo", **kwargs) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Lightning would pick gloo for a CPU root device too; explicit so that it is never NCCL.
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        # DeepSpeedStrategy raises unless the accelerator is CUDAAccelerator; skip to DDP's setup.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy first checks that device indices equal local ranks, but CPU devices
        # have no index (the root device is plain ``cpu``). The rest is as in the parent.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        # The parent passes ``device_rank=root_device.index``, None on CPU, which DeepSpeed compares
        # with 0; -1 tells it not to select a device (its CPU accelerator has one device, ``cpu``).
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=-1),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer
