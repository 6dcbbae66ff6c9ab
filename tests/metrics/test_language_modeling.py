import math

import torch
import torch.nn.functional as F

from nl_lightning.metrics import BitsPerByte


def test_bits_per_byte_is_mean_nll_over_ln2_across_updates():
    torch.manual_seed(0)
    metric = BitsPerByte()
    logits, targets = torch.randn(2, 10, 256), torch.randint(0, 256, (2, 10))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    metric.update(nll[:7].sum(), 7)
    metric.update(nll[7:].sum(), 13)
    torch.testing.assert_close(metric.compute(), (nll.mean() / math.log(2)).float())


def test_uniform_prediction_is_eight_bits_per_byte():
    metric = BitsPerByte()
    metric.update(torch.tensor(100 * math.log(256)), 100)
    torch.testing.assert_close(metric.compute(), torch.tensor(8.0))
