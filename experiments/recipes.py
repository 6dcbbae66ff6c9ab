"""Recipe compositions as config dicts, for the studies that train many of them in one process:
what ``nl-lightning fit --config a.yaml --config b.yaml …`` would run, resolved by LightningCLI's
own stacking rules, plus dotted overrides."""

from __future__ import annotations

from pathlib import Path

import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from experiments.common import REPO_ROOT


class _ParseOnlyCLI(LightningCLI):
    """LightningCLI that parses and stops: no model, data or trainer is built."""

    def instantiate_classes(self) -> None:
        pass


def compose(configs: list[str | Path]) -> dict:
    """The config ``nl-lightning fit --config <each of configs>`` runs, resolved into one dict: the
    files (relative to the repository root) stacked by LightningCLI's own rules (a later
    ``class_path`` keeps only the ``init_args`` the new class takes), so a run built from it is the
    run the composition is on the command line."""
    cli = _ParseOnlyCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=[arg for path in configs for arg in ("--config", str(REPO_ROOT / path))],
        auto_configure_optimizers=False, save_config_callback=None,
    )
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))


def set_path(config: dict, dotted: str, value) -> None:
    """``config[a][b][0][c] = value`` for ``dotted = "a.b.0.c"`` (list indices as integers)."""
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise KeyError(f"override {dotted!r}: {key!r} is not an index of a list of {len(node)}")
            node = node[int(key)]
        else:
            if node.get(key) is None:  # absent, or unset in the composed config (e.g. overrides: null)
                node[key] = {}
            node = node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def build(config: dict):
    """Model, datamodule and trainer of a composed config, as ``nl-lightning fit`` builds them."""
    return LightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=config, run=False, auto_configure_optimizers=False, save_config_callback=None,
    )
