"""Training throughput of models, side by side in one run.

    .venv/bin/python -m benchmarks.throughput transformer titans hope --steps 20
    python -m benchmarks.throughput transformer hope --device cuda --precision bf16-mixed
    python -m benchmarks.throughput transformer hope --seq-len 1024 --batch-size 4 --override memory_impl=triton
    python -m benchmarks.throughput transformer hope --device cuda --compile '{"backend": "cudagraphs"}'

Each model (``transformer``, ``titans``, ``hope``) is built as the LM recipes build it
(``recipes/lm/base.yaml`` + ``models/<model>.yaml``: the ``--preset`` with ``--override``
``KEY=VALUE`` fields of ``ModelConfig``, AdamW lr 3e-3, weight decay 0.1, betas (0.9, 0.95), on
``ByteLMDataModule`` batches of ``--batch-size`` × ``--seq-len`` bytes). Each trains ``--steps``
optimizer steps (after ``--warmup`` untimed ones; the models take turns step by step), and the table
reports tokens/s, the FLOPs of one step (counted by ``torch.utils.flop_counter``, forward +
backward), and MFU = achieved FLOP/s divided by this machine's matmul peak measured in the same
run (float32, or bf16 with ``--precision bf16-mixed``). Ratios between rows are the meaningful
numbers; absolute values depend on the machine and its load. With ``--device cuda`` each timed
step is bracketed by ``torch.cuda.synchronize()``; ``bf16-mixed`` runs the forward under bf16 autocast as Lightning's
``precision="bf16-mixed"`` does (the memory kernels still compute in float32).
``--cuda-graph`` records each model's whole step (forward, backward, AdamW) as one CUDA graph
and times its replays: the step without per-kernel launch cost, for both sides of a ratio.
``--compile`` passes ``LanguageModel(compile=...)`` (``true`` or a dict of ``torch.compile``
arguments, JSON or YAML). ``benchmarks/kernel_bound.py`` splits a step's time into its heavy
kernels and the rest.

Two corrections to torch's FLOP counter (``FLOP_FORMULAS``, passed as its ``custom_mapping``):
it has formulas for the CUDA attention kernels but not for the CPU one
(``_scaled_dot_product_flash_attention_for_cpu``), which it counted as 0 — on CPU that hid
Transformer++'s whole attention cost; and its convolution backward ignores ``groups``, which
counted the depthwise causal convolutions of Titans and HOPE as dense ones (22 of Titans-tiny's
76 GFLOP at B=4, T=1024, against a real cost of a few MFLOP). Attention is counted like torch's
GPU formulas, the full T×T score matrix even when causal (the kernel skips about half of it).
"""

from __future__ import annotations

import argparse
import contextlib
import traceback
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.devices import resolve_device
from benchmarks.timing import time_call
from experiments.common import key_values
from nl_lightning.data import ByteLMDataModule
from nl_lightning.models import PRESETS, Hope, Titans, TransformerPP
from nl_lightning.modules import LanguageModel

PRECISIONS = {"32": torch.float32, "bf16-mixed": torch.bfloat16}
MODELS = {"transformer": TransformerPP, "titans": Titans, "hope": Hope}


def matmul_peak_flops(
    size: int = 1024, repeats: int = 20, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32
) -> float:
    """Best FLOP/s of a square matmul: the denominator of MFU on this machine."""
    if device.type == "cuda":
        size = max(size, 8192)  # a 1024^3 product is over before a GPU reaches its rate
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    # The best of up to ``repeats`` calls within a time budget, not time_interleaved's fixed count.
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        elapsed, _ = time_call(lambda: a @ b, device)
        best, spent = min(best, elapsed), spent + elapsed
        if spent > 2.0:  # enough samples; bf16 on a CPU without bf16 units takes seconds per product
            break
    return 2 * size**3 / best


def _attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _convolution_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding,
    _groups, output_mask, out_shape=None,
) -> int:
    """Each requested gradient (input, weight) costs one forward convolution. The forward count
    reads the weight's (out, in / groups, ...) shape, so a grouped convolution counts its real work."""
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


aten = torch.ops.aten
FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flop,
    aten.convolution_backward: _convolution_backward_flop,
}


def count_flops() -> FlopCounterMode:
    """torch's FLOP counter with the corrections above."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


@dataclass(frozen=True)
class Workload:
    """What every model of a run trains on, and how it is built: the ``ModelConfig`` preset and
    overrides, ``LanguageModel``'s ``compile`` and the byte-LM batches."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    compile: bool | dict[str, Any] = False
    seq_len: int = 256
    batch_size: int = 16
    max_bytes: int = 8_000_000


def build(model: str, workload: Workload) -> tuple[LanguageModel, ByteLMDataModule]:
    """The LM recipes' module (recipes/lm/base.yaml + models/<model>.yaml) and data, set up to train."""
    network = MODELS[model](workload.preset, overrides=workload.overrides)
    optimizer = partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    module = LanguageModel(network, optimizer=optimizer, warmup_steps=30, lr_schedule="cosine", compile=workload.compile)
    data = ByteLMDataModule(seq_len=workload.seq_len, batch_size=workload.batch_size, max_bytes=workload.max_bytes)
    data.prepare_data()
    data.setup("fit")
    return module, data


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that make a ``Workload`` (``workload_from`` reads them back)."""
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="ModelConfig preset of every model")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a ModelConfig field for every model, the value read as YAML (e.g. memory_impl=chunk, "
                        "attn_window=16); repeat for more")
    parser.add_argument("--compile", default="false", metavar="YAML",
                        help="LanguageModel's compile: true, or torch.compile arguments, e.g. '{\"backend\": \"cudagraphs\"}'")
    parser.add_argument("--seq-len", type=int, default=256, help="bytes per training window")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-bytes", type=int, default=8_000_000, help="cap on the byte corpus (ByteLMDataModule)")


def workload_from(args: argparse.Namespace) -> Workload:
    overrides = key_values(args.override, "--override", "memory_impl=chunk")
    compile_options = yaml.safe_load(args.compile)
    if not isinstance(compile_options, (bool, dict)):
        raise SystemExit(f"--compile {args.compile!r}: give true, false or a dict, e.g. '{{\"backend\": \"cudagraphs\"}}'")
    return Workload(args.preset, overrides, compile_options, args.seq_len, args.batch_size, args.max_bytes)


def train_step(module, optimizer, inputs, targets, autocast=contextlib.nullcontext) -> None:
    with autocast():
        logits = module(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Run:
    """One model's module, optimizer and batches, stepped one optimizer step at a time."""

    def __init__(
        self,
        model: str,
        workload: Workload = Workload(),
        device: torch.device = torch.device("cpu"),
        precision: str = "32",
        cuda_graph: bool = False,
    ) -> None:
        self.model, self.device = model, device
        self.module, data = build(model, workload)
        self.module.to(device).train()
        self.autocast = contextlib.nullcontext
        if precision != "32":
            # A graph replays the casts it recorded; autocast's weight-cast cache would hand it
            # tensors freed when the recording's autocast region closed (torch.cuda.graph docs).
            self.autocast = lambda: torch.autocast(device.type, dtype=PRECISIONS[precision], cache_enabled=not cuda_graph)
        self.optimizer = self.module.optimizer_factory(self.module._param_groups())
        if cuda_graph:
            make_capturable(self.optimizer)
        self.batches = iter(data.train_dataloader())
        self.graph = None  # the first, FLOP-counted step runs eagerly
        with count_flops() as counter:
            self.step()
        self.flops_per_step = counter.get_total_flops()
        # The Trainer's first hook, which applies LanguageModel's compile. Only after the FLOP
        # count: a network first called under the counter's dispatch mode is never compiled
        # (dynamo skips the frame for good).
        self.module.setup("fit")
        if cuda_graph:
            self.graph = capture_train_step(self)
        self.seconds, self.tokens, self.steps = 0.0, 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(x.to(self.device) for x in next(self.batches))

    def step(self) -> int:
        if self.graph is not None:
            return self.graph.step(*self.next_batch())
        inputs, targets = self.next_batch()
        train_step(self.module, self.optimizer, inputs, targets, self.autocast)
        return targets.numel()

    def timed_step(self) -> None:
        # One step at a time, not time_interleaved: each step draws a new batch and trains on it,
        # and the runs add up tokens and seconds over steps rather than keeping per-call times.
        seconds, tokens = time_call(self.step, self.device)
        self.seconds += seconds
        self.tokens += tokens
        self.steps += 1


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Keep the optimizer's step counters on the GPU so its step can be recorded in a graph
    (Adam and AdamW read them on the host otherwise)."""
    if not all("capturable" in group for group in optimizer.param_groups):
        raise SystemExit(f"--cuda-graph: {type(optimizer).__name__} has no capturable mode; use Adam or "
                         "AdamW, or leave out --cuda-graph")
    for group in optimizer.param_groups:
        group["capturable"] = True


class GraphedTrainStep:
    """One training step (forward, backward, optimizer step) recorded as a CUDA graph.

    Replaying it submits every kernel of the step in one call, so the time it measures is the
    step without the host's per-kernel launch cost; the kernels still run one after another, so
    what remains is their own GPU time, which only fewer, larger (fused) kernels would cut. A step
    reads its batch from fixed input tensors, so ``step`` copies each new batch into them first.
    """

    def __init__(self, run: "Run", warmup: int = 3) -> None:
        # Copies: the graph owns its input tensors and each step overwrites them.
        self.inputs, self.targets = (x.clone() for x in run.next_batch())
        module, optimizer = run.module, run.optimizer

        def record() -> None:
            train_step(module, optimizer, self.inputs, self.targets, run.autocast)

        # Warm-up on a side stream, as torch.cuda.graph asks: lazy initialisation (cuBLAS
        # handles, autograd's stream bookkeeping) must not happen during the capture.
        side = torch.cuda.Stream(run.device)
        side.wait_stream(torch.cuda.current_stream(run.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                record()
        torch.cuda.current_stream(run.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            record()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> int:
        # Training loaders drop the last partial batch, so every batch has the recorded shape.
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.graph.replay()
        return targets.numel()


class NotRecordable(RuntimeError):
    """A model's training step does what a CUDA graph cannot record (a host sync, a copy from
    pageable host memory); its cause's traceback names the op."""


def capture_train_step(run: "Run") -> GraphedTrainStep:
    try:
        return GraphedTrainStep(run)
    except RuntimeError as error:
        raise NotRecordable(f"{run.model}'s training step cannot be recorded as a CUDA graph: {error}") from error


def build_runs(models: list[str], *options) -> tuple[list["Run"], list[str]]:
    """A ``Run`` per model; with ``--cuda-graph``, the models whose step cannot be recorded are
    left out (their traceback printed) so the others are still measured."""
    runs, unrecordable = [], []
    for model in models:
        try:
            runs.append(Run(model, *options))
        except NotRecordable as error:
            traceback.print_exception(error)
            unrecordable.append(model)
    if not runs:
        raise SystemExit("--cuda-graph: no model's training step could be recorded (tracebacks above); "
                         "leave out --cuda-graph to time them eagerly")
    return runs, unrecordable


def train_interleaved(runs: list[Run], warmup: int, steps: int) -> None:
    """``warmup`` untimed then ``steps`` timed steps of every run, the models taking turns step by
    step so that load on the machine hits all of them alike."""
    for _ in range(warmup):
        for run in runs:
            run.step()
    for _ in range(steps):
        for run in runs:
            run.timed_step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", choices=sorted(MODELS), metavar="MODEL",
                        help=f"models to time side by side, of {sorted(MODELS)}; the first is the baseline of the "
                        "ratios (default: transformer)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    add_workload_arguments(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). On cores shared with other jobs use 1: with "
        "more, OpenMP waits on descheduled threads and small kernels slow down by orders of magnitude",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="32", choices=sorted(PRECISIONS),
                        help="32 (float32) or bf16-mixed (bf16 autocast, as Lightning's precision flag)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="record each model's training step as one CUDA graph and time its replays: the "
                        "step without per-kernel launch cost (needs --device cuda)")
    args = parser.parse_args(argv)
    models, workload = args.models or ["transformer"], workload_from(args)
    device = resolve_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"--cuda-graph records CUDA kernels; add --device cuda (got --device {args.device})")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    peak = matmul_peak_flops(device=device, dtype=PRECISIONS[args.precision])
    runs, unrecordable = build_runs(models, workload, device, args.precision, args.cuda_graph)
    train_interleaved(runs, args.warmup, args.steps)
    rows = [
        {
            "model": run.model,
            "params": run.module.num_parameters(),
            "tokens_per_s": run.tokens / run.seconds,
            "flops_per_s": run.flops_per_step * run.steps / run.seconds,
        }
        for run in runs
    ]
    baseline = rows[0]["tokens_per_s"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\nmatmul peak on this machine: {peak / 1e9:.1f} GFLOP/s ({PRECISIONS[args.precision]}, {where})\n")
    overrides = "".join(f", {key}={value}" for key, value in workload.overrides.items())
    print(f"{workload.preset} preset{overrides}, batch {workload.batch_size}×{workload.seq_len} bytes\n")
    print("| model | params | tokens/s | vs first | MFU |\n| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['model']} | {row['params'] / 1e6:.2f}M | {row['tokens_per_s']:,.0f} | "
            f"{row['tokens_per_s'] / baseline:.2f}x | {row['flops_per_s'] / peak:.1%} |"
        )
    for model in unrecordable:
        print(f"| {model} | not recordable as a CUDA graph (traceback above) | | | |")


if __name__ == "__main__":
    main()
