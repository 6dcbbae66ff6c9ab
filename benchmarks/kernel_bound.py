"""How fast could a model's training step be if only its heavy kernels took time?

    .venv/bin/python -m benchmarks.kernel_bound transformer hope --seq-len 1024 --batch-size 4

Each model is built as ``benchmarks.throughput`` builds it (the LM recipes' settings; the same
``--preset``, ``--override``, ``--seq-len``, ``--batch-size`` options). For each: record every
matmul-family call (mm, bmm, addmm, baddbmm), triangular solve, attention and convolution kernel
of one training step with its shapes and strides, time each distinct call on its own (fresh
random inputs of the same layout, warm caches, back to back), and sum — the *kernel bound*: the
step time if everything else (elementwise ops, autograd, Python, the allocator) cost nothing and
every kernel ran as fast as it does alone. The models' real steps are timed in the same run,
taking turns.

The last column divides the first model's measured step time by each model's kernel bound: the
best tokens/s ratio against the first model that any amount of overhead removal could reach
while keeping the model's kernel shapes. When it is below a throughput goal, that goal needs
different kernels (fusion, other shapes, other hardware), not less overhead.

The recorder is a dispatch mode, and under one the models' default ``memory_impl="auto"`` runs the
ATen chunk kernels and convolution (a fused C++ kernel's insides are invisible to it;
``nl_lightning/ops/cpu_extension.py``).
So the bound is that of the ATen path: time the real steps on the same path with
``--override memory_impl=chunk``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.throughput import MODELS, Run, add_workload_arguments, train_interleaved, workload_from
from benchmarks.timing import time_interleaved

aten = torch.ops.aten

# Op packets whose calls make up the bound. In-place and out-of-place forms of the matmul family
# both appear (autograd accumulates with baddbmm_/addmm_).
HEAVY = {
    aten.mm, aten.bmm, aten.addmm, aten.addmm_, aten.baddbmm, aten.baddbmm_,
    aten.linalg_solve_triangular,
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward,
    aten.convolution, aten.convolution_backward,
}  # fmt: skip


class TensorSpec(tuple):
    """(shape, stride, dtype) of a tensor argument: enough to rebuild one with the same layout."""

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls((tuple(t.shape), tuple(t.stride()), t.dtype))

    def make(self) -> torch.Tensor:
        shape, stride, dtype = self
        # Storage filled first, then viewed: broadcast (stride-0) arguments can't be written through.
        # Small values keep unit-triangular solves well conditioned and exp() in attention finite,
        # so no inf/NaN/denormal slows a kernel down.
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        return torch.empty(size, dtype=dtype).normal_(0, 0.05).as_strided(shape, stride)


def _spec(arg):
    if isinstance(arg, torch.Tensor):
        return TensorSpec.of(arg)
    if isinstance(arg, (list, tuple)):
        return tuple(_spec(a) for a in arg)
    return arg


def _materialise(spec):
    if isinstance(spec, TensorSpec):
        return spec.make()
    if isinstance(spec, tuple):
        return tuple(_materialise(s) for s in spec)
    return spec


class RecordHeavyCalls(TorchDispatchMode):
    """Counts the heavy kernel calls (``HEAVY``) by op and argument layout, and all op calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.all_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.all_calls += 1
        if func.overloadpacket in HEAVY:
            self.calls[(func, _spec(args), tuple(sorted((k, _spec(v)) for k, v in kwargs.items())))] += 1
        return func(*args, **kwargs)


def time_kernel(func, args_spec, kwargs_spec, min_seconds: float = 2e-3, repeats: int = 5) -> float:
    """Median seconds of one call on fresh inputs of the recorded layout, calls timed in batches
    long enough for the clock (back to back: the kernel alone, its caches warm)."""
    args, kwargs = _materialise(args_spec), dict(_materialise(kwargs_spec))

    def batch(calls: int) -> None:
        for _ in range(calls):
            func(*args, **kwargs)

    func(*args, **kwargs)
    # Batch size: as many calls as fit in min_seconds (a count, not a measurement; also warm-up).
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds:
        func(*args, **kwargs)
        calls += 1
    return time_interleaved({"batch": partial(batch, calls)}, repeats)["batch"].median / calls


def kernel_bound(run: Run) -> tuple[float, int, int]:
    """(seconds, heavy calls, all op calls) of one training step of ``run``, its kernels timed alone."""
    with RecordHeavyCalls() as recorder:
        run.step()
    seconds = sum(count * time_kernel(func, a, kw) for (func, a, kw), count in recorder.calls.items())
    return seconds, sum(recorder.calls.values()), recorder.all_calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", choices=sorted(MODELS), metavar="MODEL",
                        help=f"models of {sorted(MODELS)}; the first is the baseline of the last column")
    parser.add_argument("--steps", type=int, default=5, help="timed real steps per model")
    parser.add_argument("--warmup", type=int, default=1)
    add_workload_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    workload = workload_from(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = [Run(model, workload) for model in args.models]
    train_interleaved(runs, args.warmup, args.steps)
    bounds = [kernel_bound(run) for run in runs]
    first_step = runs[0].seconds / runs[0].steps
    print(f"\n{torch.get_num_threads()} threads\n")
    print("| model | step s | kernel bound s | heavy calls | all op calls | bound / step | best ratio vs first |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run, (bound, calls, all_calls) in zip(runs, bounds):
        step = run.seconds / run.steps
        print(
            f"| {run.model} | {step:.3f} | {bound:.3f} | {calls} | {all_calls} | {bound / step:.0%} | "
            f"{first_step / bound:.2f}x |"
        )


if __name__ == "__main__":
    main()
