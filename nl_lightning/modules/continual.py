"""Continual learning: one classifier trained task after task, evaluated on every task after each."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from nl_lightning.checkpoint_io import check_state_dict_matches
from nl_lightning.metrics.continual import continual_summary
from nl_lightning.models.classifiers import CMSClassifier, CNNClassifier, MLPClassifier

ARCHS = ("mlp", "cnn", "cms")


class ContinualClassifier(LightningModule):
    r"""Trains one network through a task stream and fills the accuracy matrix R[i, j].

    Runs with ``nl_lightning.data.ContinualDataModule`` in ONE ``Trainer.fit``
    (``max_epochs = num_tasks · epochs_per_task``, ``reload_dataloaders_every_n_epochs=1``):
    epoch e trains task ``e // epochs_per_task``; validation has one loader per task.

    - Training: cross-entropy on ``(x, y, task_ids)``; in task-incremental streams (scenario
      ``task``) each example's logits are masked to its task's classes, in domain- and
      class-incremental ones they are not. Continual strategies among the Trainer's callbacks
      (``nl_lightning.callbacks``: ``EWC``, ``SynapticIntelligence``, ``ExperienceReplay``, or
      any callback with the same methods) are called here: ``on_task_start`` at the first epoch
      of each task, ``transform_batch`` before the forward pass, ``penalty`` added to the loss.
    - Validation: accuracy on every task (``continual/acc_task{j}``). The validation that ends
      a task's last epoch writes row i of ``accuracy_matrix`` (all tasks, so the entries above the
      diagonal record forward transfer) and logs ``continual/{average_accuracy,
      backward_transfer, forgetting, retention, learning_accuracy}`` from
      ``nl_lightning.metrics.continual.continual_summary``. R is a buffer, so checkpoints
      (written at that validation's end) keep it. At the end of training R goes to TensorBoard as
      text and as an image.

    Args:
        network: any ``nn.Module`` mapping ``(B, *input_shape)`` → ``(B, num_classes)`` logits
            (``nl_lightning.models.MLPClassifier``, ``CNNClassifier``, ``CMSClassifier``…). A
            network may define ``param_groups()`` (e.g. CMS levels carrying ``period``). None
            builds ``arch`` at ``setup`` for the stream's input shape and classes (pass the
            network explicitly when a callback needs parameter names at its own ``setup``).
        arch: ``mlp`` (two hidden layers of ``hidden``), ``cnn`` or ``cms`` (CMS levels of width
            ``hidden``, periods 1/4/16) when ``network`` is None.
        optimizer: optimizer class/callable taking param groups (recipe: ``class_path``), e.g.
            ``torch.optim.SGD`` or ``nl_lightning.optim.NestedOptimizer``.
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        arch: Literal["mlp", "cnn", "cms"] = "mlp",
        hidden: int = 100,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if hidden < 1:
            raise ValueError(f"hidden must be a positive width, got {hidden!r}")
        self.save_hyperparameters(ignore=["network", "optimizer"])
        self.network = network
        self.optimizer_factory = optimizer
        self.register_buffer("accuracy_matrix", torch.empty(0, 0))
        self.register_buffer("class_mask", torch.empty(0, 0, dtype=torch.bool), persistent=False)
        self.scenario = "domain"
        self.epochs_per_task = 1
        self.task_accuracy = nn.ModuleList()
        self._pending_row: int | None = None  # the task whose last batch was trained, awaiting its validation
        self._built_network = False  # True when setup built `arch` (then checkpoints carry what rebuilds it)
        self._input_shape: tuple[int, ...] = ()

    @property
    def num_tasks(self) -> int:
        return self.accuracy_matrix.shape[0]

    @property
    def current_task(self) -> int:
        return self.trainer.current_epoch // self.epochs_per_task

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def mask_logits(self, logits: Tensor, task_ids: Tensor) -> Tensor:
        """Task-incremental streams: logits of classes outside each example's task set to the minimum."""
        if self.scenario != "task":
            return logits
        return logits.masked_fill(~self.class_mask[task_ids], torch.finfo(logits.dtype).min)

    def task_dataset(self, task: int, split: Literal["train", "test"] = "train") -> TensorDataset:
        """The stream's dataset of ``task`` (strategies such as EWC read the finished task's data here)."""
        return getattr(self.trainer.datamodule.stream.tasks[task], split)

    # -- hooks, in the order they fire -------------------------------------------------------

    def setup(self, stage: str) -> None:
        stream = getattr(getattr(self.trainer, "datamodule", None), "stream", None)
        if stream is None:
            raise ValueError(
                "ContinualClassifier needs a datamodule with a task stream (nl_lightning.data.ContinualDataModule, "
                "or any LightningDataModule setting `.stream` to a TaskStream in setup); got "
                f"{type(getattr(self.trainer, 'datamodule', None)).__name__}"
            )
        self.scenario = stream.scenario
        self.epochs_per_task = int(getattr(self.trainer.datamodule, "hparams", {}).get("epochs_per_task", 1))
        if self.network is None:
            self.network = self._build_network(stream.input_shape, stream.num_classes)
        self._check_network(stream)
        T = stream.num_tasks
        if self.accuracy_matrix.shape != (T, T):
            self.accuracy_matrix = torch.full((T, T), float("nan"), device=self.accuracy_matrix.device)
        mask = torch.zeros(T, stream.num_classes, dtype=torch.bool)
        for t, task in enumerate(stream.tasks):
            mask[t, list(task.classes)] = True
        self.class_mask = mask.to(self.class_mask.device)
        if len(self.task_accuracy) != T:
            self.task_accuracy = nn.ModuleList(
                MulticlassAccuracy(stream.num_classes, average="micro") for _ in range(T)
            )
        if stage == "fit":
            self._check_trainer(T)

    def on_fit_start(self) -> None:
        n_params = sum(p.numel() for p in self.network.parameters())
        rank_zero_info(f"{type(self.network).__name__}: {n_params:,} parameters; {self.num_tasks} tasks "
                       f"({self.scenario}-incremental) × {self.epochs_per_task} epochs")

    def on_train_epoch_start(self) -> None:
        if self.trainer.current_epoch % self.epochs_per_task == 0:
            for strategy in self._strategies("on_task_start"):
                strategy.on_task_start(self.trainer, self, self.current_task)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        # Batches of a joint stream (ContinualDataModule(joint=True)) carry each example's task.
        task_ids = batch[2] if len(batch) > 2 else torch.full_like(y, self.current_task)
        batch = (x, y, task_ids)
        for strategy in self._strategies("transform_batch"):
            batch = strategy.transform_batch(batch, self)
        x, y, task_ids = batch
        loss = F.cross_entropy(self.mask_logits(self(x), task_ids).float(), y)
        self.log("train/cross_entropy", loss)
        for strategy in self._strategies("penalty"):
            penalty = strategy.penalty(self)
            if penalty is not None:
                self.log(f"train/penalty/{type(strategy).__name__}", penalty)
                loss = loss + penalty
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step} (task "
                f"{self.current_task}); lower the learning rate or the penalty strength λ"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        last_epoch_of_task = (self.trainer.current_epoch + 1) % self.epochs_per_task == 0
        if last_epoch_of_task and batch_idx + 1 >= self.trainer.num_training_batches:
            self._pending_row = self.current_task

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        accuracies = self._compute_accuracies("continual")
        if self.trainer.sanity_checking or self._pending_row is None:
            return
        task, self._pending_row = self._pending_row, None
        self.accuracy_matrix[task] = accuracies.to(self.accuracy_matrix.device)
        summary = continual_summary(self.accuracy_matrix, strict=False)
        if math.isnan(summary["retention"]):
            rank_zero_warn(f"retention is undefined after task {task}: the earlier tasks had zero accuracy right after "
                           "training (nothing was learned yet); it is not logged. Check the learning rate / epochs per task")
        for name in ("average_accuracy", "backward_transfer", "forgetting", "retention", "learning_accuracy"):
            if not math.isnan(summary[name]):
                self.log(f"continual/{name}", summary[name])

    def on_train_epoch_end(self) -> None:
        if self._pending_row is not None:
            raise RuntimeError(
                f"task {self._pending_row} finished without a validation run, so row {self._pending_row} of the "
                "accuracy matrix cannot be written; validate at the end of every task (check_val_every_n_epoch "
                "must divide epochs_per_task, limit_val_batches > 0)"
            )

    def on_train_end(self) -> None:
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text") and hasattr(experiment, "add_image"):
                experiment.add_text("continual/accuracy_matrix", self.accuracy_matrix_markdown(), self.global_step)
                experiment.add_image("continual/accuracy_matrix", self._matrix_image(), self.global_step,
                                     dataformats="HWC")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        accuracies = self._compute_accuracies("test")
        self.log("test/average_accuracy", accuracies.nanmean())

    def configure_optimizers(self):
        groups = self.network.param_groups() if hasattr(self.network, "param_groups") else None
        return self.optimizer_factory(groups or [{"params": [p for p in self.network.parameters() if p.requires_grad]}])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What load_from_checkpoint needs to rebuild a network that was built from the stream.
        checkpoint["continual"] = {"input_shape": self._input_shape, "num_classes": self.class_mask.shape[1],
                                   "scenario": self.scenario, "built": self._built_network}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("continual", {})
        if self.network is None and info.get("built"):
            self.network = self._build_network(info["input_shape"], info["num_classes"])
        self.scenario = info.get("scenario", self.scenario)
        if self.network is not None:
            check_state_dict_matches(self, checkpoint, self._trainer.ckpt_path if self._trainer is not None else None,
                                     resizable=("accuracy_matrix",))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args, **kwargs) -> None:
        # R's size is the stream's task count, unknown at __init__: take the checkpoint's.
        saved = state_dict.get(prefix + "accuracy_matrix")
        if saved is not None and saved.shape != self.accuracy_matrix.shape:
            self.accuracy_matrix = torch.empty(saved.shape, device=self.accuracy_matrix.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- helpers ------------------------------------------------------------------------------

    def accuracy_matrix_markdown(self) -> str:
        """R as a markdown table (rows: after training task i; columns: task j; "–" not measured)."""
        T = self.num_tasks
        lines = ["| after \\ on | " + " | ".join(f"task {j}" for j in range(T)) + " |", "|---" * (T + 1) + "|"]
        for i, row in enumerate(self.accuracy_matrix.tolist()):
            cells = ["–" if v != v else f"{v:.3f}" for v in row]
            lines.append(f"| task {i} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _matrix_image(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        R = self.accuracy_matrix.cpu().numpy()
        figure, axes = plt.subplots(figsize=(1 + 0.6 * len(R), 0.8 + 0.6 * len(R)), dpi=100)
        image = axes.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for (i, j), value in np.ndenumerate(R):
            if value == value:
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if value < 0.6 else "black")
        axes.set_xlabel("evaluated on task j")
        axes.set_ylabel("after training task i")
        figure.colorbar(image, ax=axes, fraction=0.046)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        plt.close(figure)
        buffer.seek(0)
        return np.array(plt.imread(buffer)[..., :3] * 255, dtype=np.uint8)

    def _evaluate(self, batch: Sequence[Tensor], task: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.mask_logits(self(x), torch.full_like(y, task))
        self.task_accuracy[task].update(logits, y)

    def _compute_accuracies(self, prefix: str) -> Tensor:
        """Accuracy per task (NaN for a task without evaluated batches), logged, metrics reset."""
        values = []
        for j, metric in enumerate(self.task_accuracy):
            value = metric.compute() if metric.update_count > 0 else torch.tensor(float("nan"), device=self.device)
            metric.reset()
            values.append(value.float())
            if value == value:
                self.log(f"{prefix}/acc_task{j}", value)
        return torch.stack(values)

    def _strategies(self, method: str) -> list:
        return [c for c in self.trainer.callbacks if callable(getattr(c, method, None))]

    def _build_network(self, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        self._built_network = True
        if self.hparams.arch == "mlp":
            return MLPClassifier(input_shape, num_classes, hidden=(self.hparams.hidden,) * 2)
        if self.hparams.arch == "cnn":
            return CNNClassifier(input_shape, num_classes)
        return CMSClassifier(input_shape, num_classes, hidden=self.hparams.hidden)

    def _check_network(self, stream) -> None:
        self._input_shape = tuple(stream.input_shape)
        with torch.no_grad():
            probe = self.network(stream.tasks[0].train.tensors[0][:2].to(self.device))
        if probe.ndim != 2 or probe.shape[1] != stream.num_classes:
            raise ValueError(
                f"{type(self.network).__name__} returns logits of shape {tuple(probe.shape)} for 2 examples of "
                f"shape {self._input_shape}, but the stream {stream.name!r} has {stream.num_classes} classes; "
                f"build the network with num_classes={stream.num_classes} and input_shape={list(self._input_shape)}"
            )

    def _check_trainer(self, num_tasks: int) -> None:
        trainer, E = self.trainer, self.epochs_per_task
        if num_tasks > 1 and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                f"trainer.reload_dataloaders_every_n_epochs is {trainer.reload_dataloaders_every_n_epochs}, so the "
                "train loader would never move to the next task; set it to 1"
            )
        if trainer.max_epochs is not None and trainer.max_epochs > num_tasks * E:
            raise ValueError(
                f"trainer.max_epochs={trainer.max_epochs} is past the last task ({num_tasks} tasks × {E} epochs per "
                f"task); set max_epochs to {num_tasks * E} (or fewer to train only the first tasks)"
            )
