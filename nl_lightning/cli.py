"""``nl-lightning fit|validate|test|predict --config recipe.yaml`` (LightningCLI, subclass mode).

Recipes name classes by import path (``class_path``/``init_args``); several ``--config`` files
compose. By default every run logs to TensorBoard under ``runs/`` and keeps the last checkpoint,
written atomically (``nl_lightning.checkpoint_io.AtomicCheckpointIO``).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from nl_lightning.callbacks import PreemptionCheckpoint, TensorBoardHint
from nl_lightning.checkpoint_io import unreadable


def shipped_classes() -> dict[str, list[str]]:
    """The classes a recipe can name for each slot, read from the packages' public API."""
    import inspect

    from torch import nn

    from nl_lightning import data, models, modules

    def public(package, base: type) -> list[str]:
        found = (getattr(package, name) for name in package.__all__)
        return [
            f"{package.__name__}.{cls.__name__}"
            for cls in found
            if inspect.isclass(cls) and issubclass(cls, base) and not getattr(cls, "is_abstract_base", False)
        ]

    return {
        "model": public(modules, LightningModule),
        "model.init_args.network": public(models, nn.Module),
        "data": public(data, LightningDataModule),
    }


class NLLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always keep the last checkpoint; recipes can still tune it under `checkpoint:`.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(TensorBoardHint, "tensorboard_hint")
        # SIGTERM saves last.ckpt and exits 0; checkpoints carry the RNG states.
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path here, before anything is built, for the hyper-parameters it
        # saved: a file it cannot read gets the error that names it and the checkpoints beside it.
        try:
            super()._parse_ckpt_path()
        except Exception as error:
            path = self.config[self.config.subcommand].get("ckpt_path")
            if not path or not Path(path).is_file():
                raise
            raise unreadable(path, error) from error

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        error = parser.error

        def error_with_choices(message: str, *args, **kw):
            if "class_path" in message or "import" in message.lower() or "subclass" in message.lower():
                choices = "\n".join(f"  {key}: {', '.join(names)}" for key, names in shipped_classes().items())
                message = f"{message}\nValid classes shipped with nl_lightning (any importable subclass also works):\n{choices}"
            return error(message, *args, **kw)

        parser.error = error_with_choices
        return parser


TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
    "enable_progress_bar": True,
    # Checkpoint files are replaced atomically and fsynced: a crash mid-save keeps the last good one.
    "plugins": [{"class_path": "nl_lightning.checkpoint_io.AtomicCheckpointIO"}],
}


def build_cli(args: list[str] | None = None, run: bool = True) -> NLLightningCLI:
    """The CLI with the project's defaults; ``run=False`` only instantiates model, data and trainer."""
    return NLLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point; ``args`` (without the program name) replaces ``sys.argv`` when given."""
    build_cli(args)


if __name__ == "__main__":
    main()
