"""Language-modelling metrics as torchmetrics ``Metric``s (synchronised across DDP ranks)."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class BitsPerByte(Metric):
    """Mean next-token cross-entropy in bits, per predicted byte.

    ``update(nll_sum, n_bytes)`` takes the summed natural-log NLL of a batch and the number of
    predicted bytes, so it works for byte-level models directly. (For tokenised text pass the
    byte count the tokens cover.)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, n_bytes: int | torch.Tensor) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.n_bytes += torch.as_tensor(n_bytes, device=self.n_bytes.device)

    def compute(self) -> torch.Tensor:
        return (self.nll_sum / self.n_bytes.clamp_min(1) / math.log(2)).float()
