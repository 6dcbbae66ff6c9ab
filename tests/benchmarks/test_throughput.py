"""The throughput benchmark: its FLOP count (attention on CPU is counted, grouped convolutions are
not counted as dense ones) and its table, end to end."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import REPO_ROOT
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import benchmarks.throughput as throughput
from nl_lightning import models

SMALL = ["--seq-len", "32", "--batch-size", "2"]


def test_cpu_attention_flops_are_counted():
    shape = (2, 3, 32, 8)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    with throughput.count_flops() as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    expected = sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)
    assert expected > 0
    assert counter.get_total_flops() == expected


def conv_flops(counter_factory, groups: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of a 1-D convolution with 8 channels and kernel 4."""
    conv = torch.nn.Conv1d(8, 8, 4, groups=groups, bias=False)
    x = torch.randn(2, 8, 32, requires_grad=True)
    with counter_factory() as forward:
        y = conv(x)
    with counter_factory() as backward:
        y.sum().backward()
    return forward.get_total_flops(), backward.get_total_flops()


def test_convolution_backward_counts_grouped_work():
    # Depthwise: the backward (input and weight gradients) is two forwards' worth of work.
    forward, backward = conv_flops(throughput.count_flops, groups=8)
    assert forward == 2 * 2 * 29 * 8 * 4  # 2 FLOPs x batch x positions x channels x taps
    assert backward == 2 * forward
    # Dense: the same count as torch's own formula.
    assert conv_flops(throughput.count_flops, groups=1) == conv_flops(lambda: FlopCounterMode(display=False), groups=1)


def test_end_to_end_table_has_a_row_per_model_labelled_by_name(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    throughput.main(["transformer", "titans", "--steps", "1", "--warmup", "0", *SMALL])
    out = capsys.readouterr().out
    assert "tiny preset, batch 2×32 bytes" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| transformer |", "| titans |"))]
    assert [row[1].strip() for row in rows] == ["transformer", "titans"]
    assert all(float(row[3].replace(",", "")) > 0 for row in rows)  # tokens/s
    assert rows[0][4].strip() == "1.00x" and rows[1][4].strip().endswith("x")  # the first is the baseline


def test_workload_options_reach_the_model_and_the_data():
    parser = argparse.ArgumentParser()
    throughput.add_workload_arguments(parser)
    args = parser.parse_args(["--preset", "small", "--override", "memory_impl=chunk", "--override", "attn_window=16",
                              "--compile", '{"backend": "cudagraphs"}', "--seq-len", "64", "--batch-size", "3"])
    workload = throughput.workload_from(args)
    assert workload == throughput.Workload("small", {"memory_impl": "chunk", "attn_window": 16},
                                           {"backend": "cudagraphs"}, 64, 3, 8_000_000)
    with pytest.raises(SystemExit, match="write KEY=VALUE"):
        throughput.workload_from(parser.parse_args(["--override", "memory_impl"]))
    with pytest.raises(SystemExit, match="--compile 'fast'"):
        throughput.workload_from(parser.parse_args(["--compile", "fast"]))


def test_build_makes_the_lm_recipes_module_and_data(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    workload = throughput.Workload(overrides={"n_layer": 1}, seq_len=32, batch_size=2)
    module, data = throughput.build("hope", workload)
    assert type(module.network) is models.Hope and module.network.config.n_layer == 1
    optimizer = module.optimizer_factory(module._param_groups())
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == 3e-3 and optimizer.defaults["betas"] == (0.9, 0.95)
    assert optimizer.defaults["weight_decay"] == 0.1
    inputs, targets = next(iter(data.train_dataloader()))
    assert inputs.shape == targets.shape == (2, 32)


def test_bf16_mixed_precision_runs_the_memory_models(monkeypatch, capsys):
    # HOPE's memory kernels get mixed-dtype inputs under autocast (they run as float32 operators).
    monkeypatch.chdir(REPO_ROOT)
    throughput.main(["hope", "--steps", "1", "--warmup", "0", "--precision", "bf16-mixed", *SMALL])
    out = capsys.readouterr().out
    assert "torch.bfloat16" in out  # the MFU denominator is the bf16 matmul rate
    (row,) = [line for line in out.splitlines() if line.startswith("| hope |")]
    assert 0 < float(row.split("|")[3].replace(",", "")) < 1e7  # tokens/s of a tiny model on a CPU


def test_cuda_device_without_a_gpu_is_refused_with_the_fix(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="pass --device cpu"):
        throughput.main(["transformer", "--device", "cuda"])


def test_cuda_graph_needs_the_cuda_device(monkeypatch):
    with pytest.raises(SystemExit, match="add --device cuda"):
        throughput.main(["transformer", "--device", "cpu", "--cuda-graph"])


def test_cuda_graph_refuses_an_optimizer_it_cannot_record():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SystemExit, match="SGD has no capturable mode"):
        throughput.make_capturable(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["Hope", "TransformerPP"])
def test_replayed_cuda_graph_trains_like_eager_steps(family):
    # The recorded step, replayed on new batches, moves the weights as eager steps on the same
    # batches do (the warm-up trains on the first batch, so the eager copy does too).
    torch.manual_seed(0)
    device = torch.device("cuda")
    graphed_model = getattr(models, family)(preset="tiny").to(device)
    eager_model = copy.deepcopy(graphed_model)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, capturable=True) for m in (graphed_model, eager_model)]
    batches = [torch.randint(0, 256, (2, 2, 96), device=device).unbind() for _ in range(4)]
    warmup = 2

    run = SimpleNamespace(module=graphed_model, optimizer=optimizers[0], autocast=contextlib.nullcontext,
                          device=device, model=family, next_batch=lambda: batches[0])
    graphed = throughput.GraphedTrainStep(run, warmup=warmup)
    head_before_replays = graphed_model.head.weight.detach().clone()
    for batch in batches[1:]:
        assert graphed.step(*batch) == batch[1].numel()
    for batch in [batches[0]] * warmup + batches[1:]:
        throughput.train_step(eager_model, optimizers[1], *batch)
    torch.cuda.synchronize()
    for (name, a), b in zip(graphed_model.named_parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda m: f"{family} {name}: {m}")
    # The replays did train: the comparison above is not between two untouched models.
    assert not torch.equal(graphed_model.head.weight, head_before_replays)


def test_models_whose_step_cannot_be_recorded_are_left_out_with_their_traceback(monkeypatch, capsys):
    class FakeRun:
        def __init__(self, model, *options):
            if model == "hope":
                try:
                    raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
                except RuntimeError as error:
                    raise throughput.NotRecordable(f"{model}: cannot be recorded") from error
            self.model = model

    monkeypatch.setattr(throughput, "Run", FakeRun)
    runs, unrecordable = throughput.build_runs(["transformer", "hope", "titans"], throughput.Workload())
    assert [run.model for run in runs] == ["transformer", "titans"] and unrecordable == ["hope"]
    assert "Cannot copy between CPU and CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no model's training step could be recorded"):
        throughput.build_runs(["hope"], throughput.Workload())


def test_a_model_with_compile_is_timed_compiled_and_its_flops_counted_eagerly(monkeypatch):
    # A network first called under the FLOP counter's dispatch mode would never be compiled, so
    # the benchmark counts on the eager network and compiles afterwards, as the Trainer's setup would.
    from torch._dynamo.utils import counters  # here: importing dynamo costs every collection a second

    monkeypatch.chdir(REPO_ROOT)
    small = throughput.Workload(seq_len=32, batch_size=2)
    eager = throughput.Run("transformer", small)
    counters.clear()
    compiled = throughput.Run("transformer", dataclasses.replace(small, compile={"backend": "aot_eager"}))
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled while counting
    compiled.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled.flops_per_step == eager.flops_per_step > 0
