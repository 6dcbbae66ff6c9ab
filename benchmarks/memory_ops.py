"""Titans memory kernels side by side: chunk-parallel vs naive forward+backward time, and the
chunk kernels' peak memory at two sequence lengths.

    python -m benchmarks.memory_ops                       # default table (a few minutes on 2 cores)
    python -m benchmarks.memory_ops --lengths 512 1024 --kinds linear --repeats 5
    python -m benchmarks.memory_ops --device cuda --compiled --triton   # on a GPU, Triton column too

On a CPU the fused C++ kernel (``cpu``, ``nl_lightning/ops/titans/titans_cpu.cpp``; the same
chunked math, each (batch, head) item's loop on one thread) is a column too; ``--no-cpu-kernel``
leaves it out. Its first call builds the extension (reported apart, under a minute, cached).

All implementations are timed in the same process, interleaved repeat by repeat, so a change in
machine load hits both columns alike; the table reports medians and their ratio. Each timed call
follows an untimed call of the same implementation (``--no-settle`` turns that off): otherwise
the chunk kernel inherits the allocator state the naive loop leaves (``time_side_by_side``).

Peak memory is the highest total size of live tensors during one forward+backward of the chunk
kernels (ATen ``chunk``, ``cpu`` on a CPU, Triton with ``--triton``): on CPU from ``torch.profiler``'s memory
timeline, on CUDA from the caching allocator's peak counter. Inputs created before the call are
not counted; activations, saved tensors and gradients are. Linear scaling means a ratio of about
the ratio of lengths (8x for 1K -> 8K).

On CUDA every timed call is bracketed by ``torch.cuda.synchronize()``, so the times are the
GPU's (launches included), not the host's queueing time.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from benchmarks.devices import peak_bytes, resolve_device
from benchmarks.timing import time_call, time_interleaved
from nl_lightning.ops.titans import IMPLEMENTED, titans_memory

# Every implementation through the entry point (which imports triton only when asked).
IMPLS = {name: functools.partial(titans_memory, impl=name) for name in IMPLEMENTED}


def make_inputs(
    kind: str, batch: int, heads: int, length: int, dim: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
):
    """Inputs as a Titans layer makes them: unit-norm keys, gates in (0, 1), small initial memory.
    Drawn on the CPU (the same numbers on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    def gate(low, high):
        return low + (high - low) * torch.rand(batch, heads, length, generator=gen, dtype=dtype)

    seq = {
        "q": randn(batch, heads, length, dim),
        "k": F.normalize(randn(batch, heads, length, dim), dim=-1),
        "v": randn(batch, heads, length, dim),
        "theta": gate(0.01, 0.1),
        "eta": gate(0.5, 0.95),
        "alpha": gate(0.001, 0.05),
    }
    n_weights = 1 if kind == "linear" else 2
    weights = [randn(heads, dim, dim, scale=dim**-0.5) for _ in range(n_weights)]
    seq = {name: x.to(device) for name, x in seq.items()}
    weights = [w.to(device) for w in weights]
    for x in (*seq.values(), *weights):
        x.requires_grad_()
    return seq, weights


def forward_backward(fn, seq, weights, kind: str, chunk_size: int) -> None:
    y, state = fn(**seq, weights=weights, kind=kind, chunk_size=chunk_size)
    loss = y.square().mean() + sum(w.square().mean() for w in state.weights)
    loss.backward()


def time_side_by_side(
    impls: list[str], seq, weights, kind: str, chunk_size: int, repeats: int, settle: bool = True
) -> dict:
    """Median seconds per forward+backward for each impl, interleaving the repeats.

    With ``settle`` every timed call follows an untimed call of the same impl. Without it a timed
    call inherits the allocator state the other impl left: right after the naive loop's many
    small allocations and frees, the linear chunk kernel's MB-sized temporaries can come from
    fresh pages, which made it slower in some probes (benchmarks/RESULTS.md, "Titans memory").
    Training runs one kernel back to back, so the settled time is the one that describes it.
    """
    device = seq["q"].device if seq else torch.device("cpu")
    candidates = {name: functools.partial(forward_backward, IMPLS[name], seq, weights, kind, chunk_size)
                  for name in impls}
    timings = time_interleaved(candidates, repeats, device=device, settle=settle)
    return {name: timing.median for name, timing in timings.items()}


def peak_memory_bytes(seq, weights, kind: str, chunk_size: int, impl: str = "chunk") -> int:
    """Peak total bytes of live tensors allocated during one forward+backward of ``impl``."""

    def free_grads():
        for x in (*seq.values(), *weights):
            x.grad = None

    run = functools.partial(forward_backward, IMPLS[impl], seq, weights, kind, chunk_size)
    return peak_bytes(run, seq["q"].device, reset=free_grads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--kinds", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32, help="Dk = Dv (and the MLP hidden width)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile path")
    parser.add_argument("--triton", action="store_true", help="also time the Triton kernel (linear memory; needs --device cuda)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-cpu-kernel", dest="cpu_kernel", action="store_false",
                        help="leave out the fused C++ kernel (CPU only; included by default there)")
    parser.add_argument("--memory-lengths", type=int, nargs=2, default=[1024, 8192], metavar=("SHORT", "LONG"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--no-settle", dest="settle", action="store_false",
        help="time each call right after the other impl's call (the method before 2026-11-23; see time_side_by_side)",
    )
    # One thread by default: the naive loop is thousands of tiny ops, and on a small shared CPU
    # the OpenMP hand-off for each of them costs more than the op (10x slower at 2 threads here).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.triton and device.type != "cuda":
        parser.error(f"--triton needs a CUDA device (got --device {args.device}); Triton's CPU interpreter "
                     "is for tests, far too slow to time")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu_kernel = args.cpu_kernel and device.type == "cpu"
    impls = (["chunk", "naive"] + (["compiled"] if args.compiled else []) + (["cpu"] if cpu_kernel else [])
             + (["triton"] if args.triton else []))
    if cpu_kernel:
        from nl_lightning.ops.cpu_extension import load_extension

        seconds, _ = time_call(load_extension)
        print(f"cpu: extension ready in {seconds:.1f} s (built once per machine, cached)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, threads={args.threads}"
    print(
        f"Titans memory, forward+backward, float32, B={args.batch} H={args.heads} D={args.dim} "
        f"chunk={args.chunk_size}, {where}, median of {args.repeats}"
        + ("" if args.settle else ", unsettled (each call right after the other impl's)")
    )
    fast = [name for name in impls if name != "naive"]
    ratio_names = [f"naive/{name}" for name in fast] + (["chunk/triton"] if args.triton else [])
    header = (f"{'kind':<7}{'T':>6}" + "".join(f"{name + ' s':>12}" for name in impls)
              + "".join(f"{name:>16}" for name in ratio_names))
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        kind_impls = [name for name in impls if not (name == "triton" and kind != "linear")]  # Triton: linear only
        warm_seq, warm_weights = make_inputs(kind, args.batch, args.heads, args.chunk_size, args.dim, torch.float32, device=device)
        time_side_by_side(kind_impls, warm_seq, warm_weights, kind, args.chunk_size, repeats=1)  # warm-up / compile
        for length in args.lengths:
            seq, weights = make_inputs(kind, args.batch, args.heads, length, args.dim, torch.float32, device=device)
            med = time_side_by_side(kind_impls, seq, weights, kind, args.chunk_size, args.repeats, args.settle)
            row = f"{kind:<7}{length:>6}" + "".join(f"{med[n]:>12.4f}" if n in med else f"{'-':>12}" for n in impls)
            for ratio in ratio_names:
                slow, quick = ratio.split("/")
                row += f"{med[slow] / med[quick]:>15.1f}x" if quick in med else f"{'-':>16}"
            print(row, flush=True)

    if args.skip_memory:
        return
    short, long = args.memory_lengths
    print(f"\nPeak memory during forward+backward (T={short} vs T={long}):")
    for kind in args.kinds:
        triton = ["triton"] if args.triton and kind == "linear" else []
        for impl in ["chunk"] + (["cpu"] if cpu_kernel else []) + triton:
            peaks = []
            for length in (short, long):
                seq, weights = make_inputs(kind, args.batch, args.heads, length, args.dim, torch.float32, device=device)
                peaks.append(peak_memory_bytes(seq, weights, kind, args.chunk_size, impl))
            ratio = peaks[1] / peaks[0]
            budget = 1.0625 * long / short  # linear scaling plus a small margin (8.5x for 1K -> 8K)
            verdict = "within" if ratio <= budget else "OVER"
            print(
                f"{kind:<7}{impl:<10} {peaks[0] / 2**20:8.1f} MiB -> {peaks[1] / 2**20:8.1f} MiB   "
                f"ratio {ratio:.2f}x for {long / short:.0f}x tokens ({verdict} the {budget:.1f}x goal)"
            )


if __name__ == "__main__":
    main()
