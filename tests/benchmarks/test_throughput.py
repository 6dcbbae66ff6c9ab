"""The throughput benchmark: its FLOP count (attention on CPU is counted, grouped convolutions are
not counted as dense ones) and its table, end to end."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import load_script
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from nl_lightning import models

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_throughput():
    return load_script(REPO_ROOT / "benchmarks/throughput.py")


def test_cpu_attention_flops_are_counted():
    shape = (2, 3, 32, 8)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    with load_throughput().count_flops() as counter:
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
    throughput = load_throughput()
    # Depthwise: the backward (input and weight gradients) is two forwards' worth of work.
    forward, backward = conv_flops(throughput.count_flops, groups=8)
    assert forward == 2 * 2 * 29 * 8 * 4  # 2 FLOPs x batch x positions x channels x taps
    assert backward == 2 * forward
    # Dense: the same count as torch's own formula.
    assert conv_flops(throughput.count_flops, groups=1) == conv_flops(lambda: FlopCounterMode(display=False), groups=1)


def test_end_to_end_table(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", [
        "throughput.py", "recipes/lm/transformer_tiny.yaml", "--steps", "1", "--warmup", "0",
        "--override=--data.init_args.seq_len=32", "--override=--data.init_args.batch_size=2",
    ])  # fmt: skip
    load_throughput().main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| recipes/")]
    assert len(rows) == 1
    tokens_per_s = float(rows[0].split("|")[3].replace(",", ""))
    assert tokens_per_s > 0 and rows[0].split("|")[4].strip() == "1.00x"


def test_bf16_mixed_precision_runs_the_memory_models(monkeypatch, capsys):
    # HOPE's memory kernels get mixed-dtype inputs under autocast (they run as float32 operators).
    monkeypatch.chdir(REPO_ROOT)
    load_throughput().main([
        "recipes/lm/hope_tiny.yaml", "--steps", "1", "--warmup", "0", "--precision", "bf16-mixed",
        "--override=--data.init_args.seq_len=32", "--override=--data.init_args.batch_size=2",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "torch.bfloat16" in out  # the MFU denominator is the bf16 matmul rate
    (row,) = [line for line in out.splitlines() if line.startswith("| recipes/lm/hope_tiny.yaml")]
    assert 0 < float(row.split("|")[3].replace(",", "")) < 1e7  # tokens/s of a tiny model on a CPU


def test_cuda_device_without_a_gpu_is_refused_with_the_fix(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="pass --device cpu"):
        load_throughput().main(["recipes/lm/transformer_tiny.yaml", "--device", "cuda"])


def test_cuda_graph_needs_the_cuda_device(monkeypatch):
    with pytest.raises(SystemExit, match="add --device cuda"):
        load_throughput().main(["recipes/lm/transformer_tiny.yaml", "--device", "cpu", "--cuda-graph"])


def test_cuda_graph_refuses_an_optimizer_it_cannot_record():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SystemExit, match="SGD has no capturable mode"):
        load_throughput().make_capturable(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["Hope", "TransformerPP"])
def test_replayed_cuda_graph_trains_like_eager_steps(family):
    # The recorded step, replayed on new batches, moves the weights as eager steps on the same
    # batches do (the warm-up trains on the first batch, so the eager copy does too).
    throughput = load_throughput()
    torch.manual_seed(0)
    device = torch.device("cuda")
    graphed_model = getattr(models, family)(preset="tiny").to(device)
    eager_model = copy.deepcopy(graphed_model)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, capturable=True) for m in (graphed_model, eager_model)]
    batches = [torch.randint(0, 256, (2, 2, 96), device=device).unbind() for _ in range(4)]
    warmup = 2

    run = SimpleNamespace(module=graphed_model, optimizer=optimizers[0], autocast=contextlib.nullcontext,
                          device=device, recipe=family, next_batch=lambda: batches[0])
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


def test_recipes_whose_step_cannot_be_recorded_are_left_out_with_their_traceback(monkeypatch, capsys):
    throughput = load_throughput()

    class FakeRun:
        def __init__(self, recipe, *options):
            if recipe == "unrecordable.yaml":
                try:
                    raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
                except RuntimeError as error:
                    raise throughput.NotRecordable(f"{recipe}: cannot be recorded") from error
            self.recipe = recipe

    monkeypatch.setattr(throughput, "Run", FakeRun)
    runs, unrecordable = throughput.build_runs(["a.yaml", "unrecordable.yaml", "b.yaml"], [])
    assert [run.recipe for run in runs] == ["a.yaml", "b.yaml"] and unrecordable == ["unrecordable.yaml"]
    assert "Cannot copy between CPU and CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no recipe's training step could be recorded"):
        throughput.build_runs(["unrecordable.yaml"], [])


def test_a_recipe_with_compile_is_timed_compiled_and_its_flops_counted_eagerly(monkeypatch):
    # A network first called under the FLOP counter's dispatch mode would never be compiled, so
    # the benchmark counts on the eager network and compiles afterwards, as the Trainer's setup would.
    from torch._dynamo.utils import counters  # here: importing dynamo costs every collection a second

    monkeypatch.chdir(REPO_ROOT)
    throughput = load_throughput()
    small = ["--data.init_args.seq_len=32", "--data.init_args.batch_size=2"]
    recipe = Path("recipes/lm/transformer_tiny.yaml")
    eager = throughput.Run(recipe, small)
    counters.clear()
    compiled = throughput.Run(recipe, [*small, "--model.init_args.compile={backend: aot_eager}"])
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled while counting
    compiled.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled.flops_per_step == eager.flops_per_step > 0
