"""Next-token language modelling for any network mapping tokens (B, T) → logits (B, T, V)."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from nl_lightning.checkpoint_io import check_state_dict_matches
from nl_lightning.metrics import BitsPerByte


class LanguageModel(LightningModule):
    """Cross-entropy next-token training, with perplexity and bits-per-byte on validation.

    Args:
        network: the model (Transformer++, Titans, HOPE, or any ``nn.Module`` with the same
            forward). A network may define ``param_groups()`` to hand the optimizer its own
            groups (e.g. HOPE's CMS levels carrying ``period``). Within each group, matrices get
            weight decay and vectors/embeddings do not.
        optimizer: any optimizer class/callable taking param groups (recipe: ``class_path``).
        warmup_steps: linear warm-up length in optimizer steps.
        lr_schedule: ``cosine`` decays to ``min_lr_ratio`` × lr over the run; ``constant`` keeps lr.
        min_lr_ratio: final lr as a fraction of the peak lr for the cosine schedule.
        compile: ``torch.compile`` the network's forward (and so its backward) in place when
            training starts: ``true`` for the defaults, or a dict of ``torch.compile`` keyword
            arguments, e.g. ``{backend: cudagraphs}`` on a GPU to replay the network's kernels
            from CUDA graphs without inductor's code generation, or ``{mode: max-autotune}``.
            Parameter names, and so checkpoints, stay those of the eager network.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 100,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if not isinstance(compile, (bool, dict)):
            raise TypeError(
                f"compile must be true/false or a dict of torch.compile arguments, got {compile!r}; "
                "e.g. compile: true or compile: {backend: cudagraphs}"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters(ignore=["network", "optimizer"])
        self.network = network
        self.optimizer_factory = optimizer
        self.warmup_steps, self.lr_schedule, self.min_lr_ratio = warmup_steps, lr_schedule, min_lr_ratio
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        self._network_compiled = False
        # nan_strategy="disable": a non-finite batch makes the stage's loss NaN. MeanMetric's default
        # drops NaN values with a warning, which reports the loss of the finite batches only and
        # hides a diverging model (seen in HOPE runs with a large dgd_max_step).
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {"loss": MeanMetric(nan_strategy="disable"), "ppl": Perplexity(), "bpb": BitsPerByte()}
                )
                for stage in ("val", "test")
            }
        )
        # Validation at further lengths (ByteLMDataModule.val_lengths), one metric set per length;
        # built in setup(), where the datamodule is known.
        self.length_metrics = nn.ModuleDict()
        self._batch_started: float | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.network(tokens)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    # -- hooks, in the order they fire -------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        model_vocab = getattr(getattr(self.network, "config", None), "vocab_size", None)
        if data_vocab is not None and model_vocab is not None and data_vocab > model_vocab:
            raise ValueError(
                f"the data has {data_vocab} token ids but the network's vocab_size is {model_vocab}; "
                f"set the network's vocab_size to at least {data_vocab}"
            )
        for length in getattr(datamodule, "val_lengths", ()):
            if str(length) not in self.length_metrics:
                self.length_metrics[str(length)] = nn.ModuleDict(
                    {"loss": MeanMetric(nan_strategy="disable"), "bpb": BitsPerByte()}
                )
        if self.compile_options is not None and not self._network_compiled:
            # nn.Module.compile wraps the forward in place: no ``_orig_mod.`` prefix in state dicts.
            self.network.compile(**self.compile_options)
            self._network_compiled = True

    def on_fit_start(self) -> None:
        n_params = self.num_parameters()
        rank_zero_info(f"{type(self.network).__name__}: {n_params:,} parameters")
        for logger in self.loggers:
            logger.log_metrics({"model/params": float(n_params)}, step=0)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}; lower the "
                "learning rate or set trainer.gradient_clip_val (the last checkpoint is kept)"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bpb", loss.detach() / math.log(2))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._batch_started is None:
            return
        elapsed = time.perf_counter() - self._batch_started
        tokens = batch[1].numel() * self.trainer.world_size
        self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._evaluate("val", batch)
            return
        # Further dataloaders: the datamodule's val_lengths, in order (logged as val/<metric>@<length>).
        lengths = list(self.length_metrics)
        if dataloader_idx > len(lengths):
            raise ValueError(
                f"validation dataloader {dataloader_idx} has no length: LanguageModel validates extra lengths "
                f"from the datamodule's val_lengths ({lengths or 'none'}); give the datamodule a val_lengths "
                "attribute listing the window length of each extra validation dataloader"
            )
        self._evaluate("val", batch, metrics=self.length_metrics[lengths[dataloader_idx - 1]],
                       suffix=f"@{lengths[dataloader_idx - 1]}")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before Lightning loads the weights: a checkpoint of another model fails here, naming what differs.
        check_state_dict_matches(self, checkpoint, self._trainer.ckpt_path if self._trainer is not None else None)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Greedy next-byte predictions for every position of the input window."""
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._param_groups())
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = LambdaLR(optimizer, lr_lambda=lambda step: self.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- helpers ------------------------------------------------------------------------------

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier on the peak lr: linear warm-up, then cosine to ``min_lr_ratio`` (or constant)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _param_groups(self) -> list[dict]:
        """The network's groups (or one group), each split into weight-decay and no-decay halves.

        Matrices get weight decay; vectors (norms, biases, gates) and embeddings do not. Extra
        keys a network puts on its groups (``period``, ``level``, ``name``) are kept on both halves.
        Each group carries torch's ``param_names`` (the network's parameter names), which optimizers
        that route by name (``Muon``, ``M3``: embeddings and head to AdamW) and error messages use.
        """
        if hasattr(self.network, "param_groups"):
            base_groups = self.network.param_groups()
        else:
            base_groups = [{"params": list(self.network.parameters())}]
        embeddings = {id(m.weight) for m in self.network.modules() if isinstance(m, nn.Embedding)}
        names = {id(p): name for name, p in self.network.named_parameters()}
        groups = []
        for group in base_groups:
            params = [p for p in dict.fromkeys(group["params"]) if p.requires_grad]  # a tied head appears once
            meta = {key: value for key, value in group.items() if key not in ("params", "param_names")}
            decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
            no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
            groups += [
                {**meta, "params": decay, "param_names": [names[id(p)] for p in decay]},
                {**meta, "params": no_decay, "param_names": [names[id(p)] for p in no_decay], "weight_decay": 0.0},
            ]
        return [g for g in groups if g["params"]]

    def _evaluate(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor], metrics: nn.ModuleDict | None = None,
                  suffix: str = "") -> None:
        inputs, targets = batch
        logits = self(inputs).float()
        nll_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        metrics = self.metrics[stage] if metrics is None else metrics
        metrics["loss"].update(nll_sum / targets.numel(), weight=targets.numel())
        if "ppl" in metrics:
            metrics["ppl"].update(logits, targets)
        metrics["bpb"].update(nll_sum, targets.numel())
        for name, metric in metrics.items():
            # add_dataloader_idx=False: the names already say the length (no "/dataloader_idx_1").
            self.log(f"{stage}/{name}{suffix}", metric, prog_bar=name == "loss" and not suffix, add_dataloader_idx=False)
