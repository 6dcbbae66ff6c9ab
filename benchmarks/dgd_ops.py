"""Time the DGD memory kernels (forward + backward) side by side in one run and print ratios.

    .venv/bin/python -m benchmarks.dgd_ops                      # mlp memory, T = 512 1024 2048
    .venv/bin/python -m benchmarks.dgd_ops --kind linear --impls naive chunk
    .venv/bin/python -m benchmarks.dgd_ops --device cuda        # on a GPU (synchronized timing)
    .venv/bin/python -m benchmarks.dgd_ops --rule delta         # the models' default write rule

The default implementations are naive, chunk, compiled and, for the mlp memory, the fused kernels:
the C++ one on CPU (cpu; its first call builds the extension) and the Triton one on a GPU
(triton; its first call compiles the kernels). Build and compile times are reported separately.

Every implementation runs on the same inputs in the same process, interleaved repeat by repeat
at each length, so the ratios compare like with like; absolute times depend on the machine. The compiled kernel is warmed
up (compiled) before timing, and its compile time is reported separately.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.devices import resolve_device
from benchmarks.timing import time_call, time_interleaved
from nl_lightning.ops.dgd import dgd_memory


def make_inputs(args, length, device=torch.device("cpu")):
    """Drawn on the CPU (the same numbers on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.heads, length, args.dim)

    def leaf(x):
        return x.to(device).requires_grad_()

    def randn(*s, scale=1.0):
        return leaf(torch.randn(*s, generator=gen, dtype=dtype) * scale)

    seq = {
        "q": randn(*shape),
        "k": leaf(F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)),
        "v": randn(*shape, scale=0.5),
        "eta": leaf(torch.rand(shape[:3], generator=gen, dtype=dtype) * 0.5),
        "alpha": leaf(0.9 + 0.1 * torch.rand(shape[:3], generator=gen, dtype=dtype)),
    }
    h, d, dh = args.heads, args.dim, args.hidden
    if args.kind == "linear":
        return seq, (randn(h, d, d, scale=0.1),)
    return seq, (randn(h, d, dh, scale=0.1), randn(h, dh, d, scale=0.1))


# The write rules as the models use them: the paper's DGD with its self-made target, the delta
# rule with the value as target (ModelConfig's defaults).
RULE_OPTIONS = {"dgd": dict(rule="dgd", target="self"), "delta": dict(rule="delta", target="value")}


def forward_backward(seq, weights, args, impl):
    o, state = dgd_memory(**seq, weights=weights, kind=args.kind, chunk_size=args.chunk_size, impl=impl,
                          **RULE_OPTIONS[args.rule])
    (o.square().mean() + sum(s.square().mean() for s in state.weights)).backward()
    return o.detach()


def time_impls(seq, weights, args) -> dict[str, tuple[float, torch.Tensor]]:
    """Per implementation: median seconds of a forward+backward (repeats interleaved, after one
    untimed call each that warms the allocator and, for compiled, its guards) and its output."""
    outputs = {}

    def run(impl):
        outputs[impl] = forward_backward(seq, weights, args, impl)

    def clear_grads(impl):
        for x in (*seq.values(), *weights):
            x.grad = None

    candidates = {impl: partial(run, impl) for impl in args.impls}
    timings = time_interleaved(candidates, args.repeats, warmup=1, device=seq["q"].device, before=clear_grads)
    return {impl: (timings[impl].median, outputs[impl]) for impl in args.impls}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["linear", "mlp"], default="mlp")
    parser.add_argument("--rule", choices=list(RULE_OPTIONS), default="dgd",
                        help="write rule: dgd (the paper's, self-made target) or delta (value target)")
    impls = ["naive", "chunk", "compiled", "cpu", "triton"]
    parser.add_argument("--impls", nargs="+", choices=impls, help="default: every one that applies")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64, help="Dh of the mlp memory")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads. Default 1: the naive loop is thousands of tiny ops, and with "
        "more threads on shared cores their OpenMP synchronisation, not the math, sets its time",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.impls is None:
        fused = {"cpu": ["cpu"], "cuda": ["triton"]}.get(device.type, []) if args.kind == "mlp" else []
        args.impls = ["naive", "chunk", "compiled"] + fused
    torch.set_num_threads(args.threads)
    if "naive" not in args.impls:
        parser.error("--impls must include naive: ratios are naive time / other time")

    print(
        f"DGD memory fwd+bwd, kind={args.kind}, rule={args.rule}, B={args.batch} H={args.heads} D={args.dim}"
        + (f" Dh={args.hidden}" if args.kind == "mlp" else "")
        + f" C={args.chunk_size} {args.dtype}, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads={torch.get_num_threads()}")
    )
    warm_ups = (
        ("compiled", "compile"),
        ("cpu", "extension build, cached per machine"),
        ("triton", "kernel compile, cached per machine"),
    )
    for impl, what in warm_ups:
        if impl in args.impls:
            seq, weights = make_inputs(args, args.chunk_size * 2, device)
            seconds, _ = time_call(lambda: forward_backward(seq, weights, args, impl), device)
            print(f"{impl} warm-up ({what}) time: {seconds:.1f} s")

    others = [impl for impl in args.impls if impl != "naive"]
    header = ["T"] + [f"{impl} ms" for impl in args.impls] + [f"naive/{impl}" for impl in others]
    header += [f"max|o_{impl}-o_naive|" for impl in others]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for length in args.lengths:
        seq, weights = make_inputs(args, length, device)
        results = time_impls(seq, weights, args)
        base, base_o = results["naive"]
        row = [str(length)] + [f"{results[impl][0] * 1e3:.1f}" for impl in args.impls]
        row += [f"{base / results[impl][0]:.3g}x" for impl in others]  # .3g: the interpreter gives ~0.01x
        row += [f"{(results[impl][1] - base_o).abs().max().item():.1e}" for impl in others]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
