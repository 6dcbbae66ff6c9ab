"""The DGDInputCapture callback (callbacks/dgd_inputs.py): it feeds DGD the linear layers' inputs during fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from nl_lightning.callbacks import DGDInputCapture
from nl_lightning.optim import DGD



class _Regression(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return DGD(self.parameters(), lr=0.1)


def _fit(module: LightningModule, callbacks: list) -> Trainer:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = Trainer(max_steps=3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer


def test_dgd_input_capture_callback_feeds_the_linear_inputs_during_fit_and_detaches_after():
    torch.manual_seed(0)
    module, twin = _Regression(), _Regression()
    twin.load_state_dict(module.state_dict())
    trainer = _fit(module, [DGDInputCapture()])
    state = trainer.optimizers[0].state[module.net[0].weight]
    assert state["input_outer"].shape == (4, 4) and state["input_sq_norm"] == 0  # captured, then consumed
    assert not module.net[0]._forward_pre_hooks  # removed at the end of fit
    with pytest.warns(UserWarning, match="plain gradient descent"):
        _fit(twin, [])  # same data and start, no callback: plain GD
    assert not torch.allclose(module.net[0].weight, twin.net[0].weight)  # the decay term acted


def test_dgd_input_capture_callback_refuses_a_run_without_dgd():
    plain = _Regression()
    plain.configure_optimizers = lambda: torch.optim.SGD(plain.parameters(), lr=0.1)
    with pytest.raises(MisconfigurationException, match="no DGD optimizer"):
        _fit(plain, [DGDInputCapture()])
