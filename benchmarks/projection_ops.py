"""Time HOPE's projection-memory op (forward + backward) side by side in one run and print ratios.

    .venv/bin/python -m benchmarks.projection_ops                  # chunk vs cpu, HOPE-tiny's shape
    .venv/bin/python -m benchmarks.projection_ops --device cuda    # chunk vs triton on a GPU

The op (``nl_lightning.ops.projection``) reads the four memories chunk by chunk and writes them
between chunks; ``triton`` runs each write as one kernel launch, ``chunk`` as ATen ops and ``cpu``
the whole loop in C++. Every implementation runs on the same inputs in the same process,
interleaved repeat by repeat at each length, so the ratios compare like with like; absolute times
depend on the machine. The first call of ``cpu`` (extension build) and ``triton`` (kernel
compile) is timed separately.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.devices import resolve_device
from benchmarks.timing import time_call, time_interleaved
from nl_lightning.ops.projection import projection_memories

# HOPE's gate scales (models/hope.py): the paper rule's step cap over the chunk, the delta rule's β = σ.
ETA_SCALE = {"dgd": 0.5 / 64, "delta": 1.0}


def make_inputs(args, length, device=torch.device("cpu")):
    """Drawn on the CPU (the same numbers on every device), then moved to ``device``: unit-norm
    inputs and weights at HOPE's initial scale."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    d, dh = args.dim, args.hidden

    def leaf(x):
        return x.to(device).requires_grad_()

    x = leaf(F.normalize(torch.randn(args.batch, length, d, generator=gen, dtype=dtype), dim=-1))
    weights = (
        leaf(0.1 * torch.randn(4, d, dh, generator=gen, dtype=dtype) / dh**0.5),
        leaf(torch.randn(4, dh, d, generator=gen, dtype=dtype) / d**0.5),
    )
    return x, weights, leaf(torch.tensor([0.0, 2.0], dtype=dtype))


def forward_backward(inputs, args, impl):
    x, weights, bias = inputs
    out = projection_memories(x, weights, bias, chunk_size=args.chunk_size, eta_scale=ETA_SCALE[args.rule],
                              rule=args.rule, impl=impl)  # fmt: skip
    out.square().mean().backward()
    return out.detach()


def time_impls(inputs, args) -> dict[str, tuple[float, torch.Tensor]]:
    """Per implementation: median seconds of a forward+backward and its output."""
    outputs = {}
    x, weights, bias = inputs

    def run(impl):
        outputs[impl] = forward_backward(inputs, args, impl)

    def clear_grads(impl):
        for t in (x, *weights, bias):
            t.grad = None

    candidates = {impl: partial(run, impl) for impl in args.impls}
    timings = time_interleaved(candidates, args.repeats, warmup=1, device=x.device, before=clear_grads)
    return {impl: (timings[impl].median, outputs[impl]) for impl in args.impls}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", choices=list(ETA_SCALE), default="delta", help="write rule (HOPE's default: delta)")
    parser.add_argument("--impls", nargs="+", choices=["naive", "chunk", "cpu", "triton"],
                        help="default: chunk and the fused kernel of the device (cpu, or triton on CUDA)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=192, help="d_model (HOPE-tiny: 192)")
    parser.add_argument("--hidden", type=int, default=48, help="the memories' hidden size (HOPE: d_model / 4)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.impls is None:
        args.impls = ["chunk", "triton" if device.type == "cuda" else "cpu"]
    if args.impls[0] != "chunk":
        parser.error("--impls must start with chunk: ratios are chunk time / other time")
    torch.set_num_threads(args.threads)
    print(
        f"HOPE projection memories fwd+bwd, rule={args.rule}, B={args.batch} D={args.dim} Dh={args.hidden} "
        f"C={args.chunk_size} {args.dtype}, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads={torch.get_num_threads()}")
    )
    for impl, what in (("cpu", "extension build"), ("triton", "kernel compile")):
        if impl in args.impls:
            inputs = make_inputs(args, args.chunk_size * 2, device)
            seconds, _ = time_call(lambda: forward_backward(inputs, args, impl), device)
            print(f"{impl} warm-up ({what}, cached per machine) time: {seconds:.1f} s")
    others = args.impls[1:]
    header = ["T"] + [f"{impl} ms" for impl in args.impls] + [f"chunk/{impl}" for impl in others]
    header += [f"max|o_{impl}-o_chunk|" for impl in others]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for length in args.lengths:
        results = time_impls(make_inputs(args, length, device), args)
        base, base_o = results["chunk"]
        row = [str(length)] + [f"{results[impl][0] * 1e3:.1f}" for impl in args.impls]
        row += [f"{base / results[impl][0]:.3g}x" for impl in others]
        row += [f"{(results[impl][1] - base_o).abs().max().item():.1e}" for impl in others]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
