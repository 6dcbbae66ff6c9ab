"""Our Titans memory layer vs lucidrains' ``titans-pytorch`` ``NeuralMemory``: forward+backward.

``titans-pytorch`` is not a project dependency; install it in a separate environment (see
``benchmarks/results_titans_pytorch.md``) and run this benchmark with that environment's python,
from the repository root::

    python -m benchmarks.titans_pytorch_compare                       # default table
    python -m benchmarks.titans_pytorch_compare --lengths 512 --repeats 3 --theirs seq
    python -m benchmarks.titans_pytorch_compare --check-semantics     # also the causality probes
    python -m benchmarks.titans_pytorch_compare --device cuda --memory-length 8192   # on a GPU

Without ``titans_pytorch`` importable the benchmark prints why and exits 0 (SKIP).

Both layers map ``(B, T, dim) -> (B, T, dim)`` with the same dim, heads, head dim, chunk size and
memory depth (a 2-layer residual MLP per head, ``M(z) = z + W_out silu(W_in z)``, hidden width =
head dim). One forward+backward is ``layer(x)`` then ``out.square().mean().backward()`` with
``x.requires_grad``, so the timed backward covers the input, the projections, the gates and the
initial memory weights on both sides. All variants are timed in one process, interleaved repeat by
repeat (a change in machine load hits every column alike), after untimed warm-up calls; the table
reports medians. On CUDA every timed call is bracketed by ``torch.cuda.synchronize()``, and peak
memory comes from the caching allocator's counter instead of the profiler's CPU timeline.

Columns (``ms`` per forward+backward):

* ``ours`` - ``TitansMemoryLayer`` with the default ``memory_impl="auto"``: on a CPU the fused C++
  kernel (``nl_lightning/ops/titans/titans_cpu.cpp``), elsewhere the ATen chunk kernel;
* ``ours-chunk`` - the same with ``memory_impl="chunk"`` (the ATen chunk kernel; CPU only, on a GPU
  it is what ``ours`` runs);
* ``ours-c`` - the same with ``memory_impl="compiled"`` (first-call compile time reported apart);
* ``tp-seq`` - ``NeuralMemory(batch_size=chunk_size)``: gradients of every chunk taken at that
  chunk's start state, the same chunked online gradient descent as ours (the fair comparison);
* ``tp-par`` - the same module with the library default ``batch_size=None``: every chunk's
  gradient is taken at the *initial* weights, so the whole sequence is one parallel step;
* ``tp-stock`` - ``NeuralMemory(model=MemoryMLP(dim_head, depth=2))`` with all library defaults
  (LayerNorm+residual wrapper, pre-RMSNorm, GELU, hidden 2x head dim, ``batch_size=None``).

The math of the two layers differs (chunk-level vs token-level updates and read-outs, ...); see
``benchmarks/results_titans_pytorch.md``. ``--check-semantics`` measures two of those differences.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import math
import os
import sys
from functools import partial

THEIRS = ("seq", "par", "stock")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=192, help="model width (d_model)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant and length")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--ours-threads", type=int, default=None,
        help="threads for our layers only (default: --threads); titans-pytorch keeps --threads. For "
        "a side-by-side comparison of each side at its own best thread count.",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-compiled", action="store_true", help="skip memory_impl='compiled'")
    parser.add_argument("--theirs", nargs="+", default=list(THEIRS), choices=THEIRS)
    parser.add_argument(
        "--theta", type=float, default=0.03,
        help="starting inner learning rate of both layers (ours: gate bias; theirs: the matching "
        "adaptive-step bias). Our default 0.1 makes the MLP memory diverge on random inputs "
        "after a few hundred tokens; the value does not change the work done.",
    )
    parser.add_argument("--memory-length", type=int, default=1024,
                        help="T of the peak-memory measurement (torch.profiler); 0 skips it")
    parser.add_argument("--check-semantics", action="store_true",
                        help="also run the causality / anchoring probes (no timing)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and max(ARGS.threads, ARGS.ours_threads or 0) > 1:
    # With more threads than idle cores (e.g. another job on a 2-core box) OpenMP's default
    # spin-waiting makes every small op ~100x slower; passive waiting costs nothing when idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.devices import peak_bytes, resolve_device  # noqa: E402
from benchmarks.timing import time_call, time_interleaved  # noqa: E402
from nl_lightning.models import ModelConfig  # noqa: E402
from nl_lightning.models.layers import gate_bias  # noqa: E402
from nl_lightning.models.titans import TitansMemoryLayer  # noqa: E402


# --------------------------------------------------------------------------------------------
# the two layers


def gpt2_init(module: nn.Module) -> None:
    """The init our backbone gives every Linear (``transformer._init_weights``)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_ours(args, impl: str) -> nn.Module:
    config = ModelConfig.from_preset(
        "tiny", d_model=args.dim, n_head=args.heads, chunk_size=args.chunk_size, memory_kind="mlp", memory_impl=impl,
        write_rule="paper",  # titans-pytorch implements the paper's momentum rule, so that is what is compared
    )
    layer = TitansMemoryLayer(config)
    layer.apply(gpt2_init)  # as inside the Titans backbone, then the layer's own gate/conv init
    layer.INITIAL_GATES = {**TitansMemoryLayer.INITIAL_GATES, "theta": args.theta}
    layer.init_weights()
    return layer


class ResidualSiluMLP(nn.Module):
    """Our memory map in titans-pytorch's convention (row vectors, ``x @ W``):
    ``M(x) = x + silu(x @ W_in) @ W_out`` - equal to ``z + W1 silu(W2 z)`` with W_in = W2^T,
    W_out = W1^T, initialised like ``TitansMemoryLayer``'s memory weights."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList([
            nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim)),  # W_in  (our W2)
            nn.Parameter(torch.randn(dim, dim) * 0.02),  # W_out (our W1)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_in, w_out = self.weights
        return x + F.silu(x @ w_in) @ w_out


def build_theirs(args, variant: str) -> nn.Module:
    from titans_pytorch import MemoryMLP, NeuralMemory

    dim_head = args.dim // args.heads
    gates, C = TitansMemoryLayer.INITIAL_GATES, args.chunk_size
    common = dict(dim=args.dim, chunk_size=args.chunk_size, heads=args.heads, dim_head=dim_head)
    if variant == "stock":
        return NeuralMemory(**common, model=MemoryMLP(dim_head, depth=2))
    layer = NeuralMemory(
        **common,
        model=ResidualSiluMLP(dim_head),
        batch_size=args.chunk_size if variant == "seq" else None,
        mem_model_norm_add_residual=False,  # no LayerNorm(M(x)) + x wrapper (ours has none)
        pre_rmsnorm=False,  # our layer has no input norm of its own (the block norms before it)
        # Gates start input-independent, matched to our INITIAL_GATES. Their loss is a mean over
        # the head dim (ours a sum), so lr = theta * dim_head gives the same step per token; their
        # momentum and decay act once per chunk, so they start at what ours amount to over a
        # chunk of constant gates: eta^C and 1 - (1 - alpha)^C.
        default_step_transform_max_lr=float(dim_head),
        init_adaptive_step_bias=gate_bias(args.theta),
        init_momentum_bias=gate_bias(gates["eta"] ** C),
        init_decay_bias=gate_bias(1 - (1 - gates["alpha"]) ** C),
        # left at their defaults, all "off": qk_rmsnorm, post_rmsnorm, accept_weight_residual,
        # per_parameter_lr_modulation, spectral_norm_surprises, max_grad_norm, gated_transition,
        # attn_pool_chunks, store_with_lookahead_value, momentum_order=1, num_kv_per_token=1
    )
    # Projections (q, k, v, retrieve gate, head merge: the bias-free Linears) get our backbone's
    # init too, so keys and values have the same scale as ours; the gate Linears keep the biases
    # set above.
    for module in layer.modules():
        if isinstance(module, nn.Linear) and module.bias is None:
            gpt2_init(module)
    return layer


def run_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out  # NeuralMemory returns (y, state)


def forward_backward(layer: nn.Module, x: torch.Tensor) -> tuple[bool, bool]:
    """One forward+backward; returns (output finite, all gradients finite)."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y = run_layer(layer, x)
    y.square().mean().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    return bool(torch.isfinite(y).all()), all(bool(torch.isfinite(g).all()) for g in grads)


# --------------------------------------------------------------------------------------------
# measurements


def time_side_by_side(
    layers: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int, threads: dict[str, int] | None = None
):
    """Median ms per forward+backward of every layer, repeats interleaved; and finiteness.
    ``threads`` sets torch's thread count per layer (default: leave it as it is)."""
    threads = threads or {}
    default_threads = torch.get_num_threads()
    finite = {name: (True, True) for name in layers}  # all calls', warm-up included

    def run(name: str) -> None:
        ok = forward_backward(layers[name], x)
        finite[name] = tuple(a and b for a, b in zip(finite[name], ok))

    def use_threads(name: str) -> None:
        torch.set_num_threads(threads.get(name, default_threads))

    try:
        timings = time_interleaved({name: partial(run, name) for name in layers}, repeats, warmup, x.device,
                                   before=use_threads)
    finally:
        torch.set_num_threads(default_threads)
    return {name: 1e3 * timing.median for name, timing in timings.items()}, finite


def peak_memory_mib(layer: nn.Module, x: torch.Tensor) -> float:
    """Peak total size of live tensors during one forward+backward (``benchmarks.devices.peak_bytes``:
    parameters and the input, allocated before, are not counted; their gradients are)."""

    def free_grads():
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return peak_bytes(lambda: forward_backward(layer, x), x.device, reset=free_grads) / 2**20


def changed_positions(layer: nn.Module, x: torch.Tensor, position: int) -> torch.Tensor:
    """Output positions (of batch element 0) that move when token ``position``'s input moves."""
    with torch.no_grad():
        base = run_layer(layer, x)
        x2 = x.clone()
        x2[:, position] += 1.0
        moved = (run_layer(layer, x2) - base).abs().amax(dim=-1)[0] > 1e-6
    return moved.nonzero().flatten()


def check_semantics(args) -> None:
    """Probes for two of the differences in the notes: where a token's store becomes visible, and
    at which weights titans-pytorch's default takes its gradients."""
    C = args.chunk_size
    T = 4 * C
    torch.manual_seed(args.seed)
    x = torch.randn(1, T, args.dim)
    p = C // 4
    print(f"\nSemantics probes (T={T}, chunk={C}): perturb the input of token {p} (inside chunk 0)")
    for name, layer in (("ours", build_ours(args, "chunk")), ("tp-seq", build_theirs(args, "seq"))):
        moved = changed_positions(layer.eval(), x, p).tolist()
        gaps = [t for t in range(p, T) if t not in moved]
        print(f"  {name:<7} outputs that change: {moved[0]}..{moved[-1]} ({len(moved)} positions); "
              f"unchanged after {p}: {describe_ranges(gaps)}")
    seq = build_theirs(args, "seq")
    par = copy.deepcopy(seq)  # same parameters (load_state_dict refuses their expanded per-head weights)
    par.batch_size = None
    with torch.no_grad():
        diff = (run_layer(seq, x) - run_layer(par, x)).abs().amax(dim=-1)[0]
    first = int((diff > 1e-6).nonzero().flatten()[0]) if bool((diff > 1e-6).any()) else None
    print(f"  tp-seq vs tp-par, same parameters: outputs equal up to position {first} "
          f"(= 2*chunk-1 = {2 * C - 1}: from chunk 2 on, batch_size=None takes gradients at W0)")


def describe_ranges(positions: list[int]) -> str:
    if not positions:
        return "none"
    ranges, start = [], positions[0]
    for a, b in zip(positions, positions[1:] + [None]):
        if b != a + 1:
            ranges.append(f"{start}..{a}" if a > start else f"{a}")
            start = b
    return ", ".join(ranges)


# --------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    try:
        importlib.import_module("titans_pytorch")
    except ImportError as err:
        print(f"SKIP: titans_pytorch is not importable ({err}). It is not a project dependency: "
              "install it in a separate venv (see benchmarks/results_titans_pytorch.md) and run "
              "python -m benchmarks.titans_pytorch_compare with that venv's python.")
        return 0

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    version = importlib.metadata.version("titans-pytorch")
    ours_threads = args.ours_threads or args.threads
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"threads={args.threads}, ours {ours_threads} "
             f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    print(f"torch {torch.__version__}, titans-pytorch {version}, {where}")
    print(f"B={args.batch} dim={args.dim} heads={args.heads} head_dim={args.dim // args.heads} "
          f"chunk={args.chunk_size} memory=2-layer residual MLP, float32, fwd+bwd, "
          f"median of {args.repeats} (after {args.warmup} warm-up)")

    layers: dict[str, nn.Module] = {"ours": build_ours(args, "auto")}
    if device.type == "cpu":
        layers["ours-chunk"] = build_ours(args, "chunk")
    if not args.no_compiled:
        layers["ours-c"] = build_ours(args, "compiled")
    for variant in args.theirs:
        layers[f"tp-{variant}"] = build_theirs(args, variant)
    layers = {name: layer.to(device) for name, layer in layers.items()}
    for name, layer in layers.items():
        n = sum(p.numel() for p in layer.parameters())
        print(f"  {name:<9} {n:>8,} parameters")

    if "ours-c" in layers:
        x = torch.randn(args.batch, args.chunk_size * 2, args.dim, device=device, requires_grad=True)
        compiled = partial(forward_backward, layers["ours-c"], x)
        first, _ = time_call(compiled, device)  # compiles the chunk step (forward and backward)
        compiled()
        steady, _ = time_call(compiled, device)
        print(f"  ours-c first fwd+bwd (torch.compile of the chunk step, once per process): "
              f"{first:.1f} s (steady state at T={2 * args.chunk_size}: {steady:.3f} s)")

    names = list(layers)
    base = [n for n in ("ours", "ours-chunk", "ours-c") if n in layers]
    threads = {n: ours_threads for n in base}
    # Columns as wide as their names (plus a gap), so that the long ones stay apart.
    ratios = [(t, o) for t in names if t.startswith("tp-") for o in base]
    widths = {n: max(12, len(n) + 5) for n in names}
    ratio_widths = {(t, o): max(14, len(t) + len(o) + 3) for t, o in ratios}
    header = f"{'T':>6}" + "".join(f"{n + ' ms':>{widths[n]}}" for n in names)
    header += "".join(f"{t + '/' + o:>{ratio_widths[t, o]}}" for t, o in ratios)
    print("\n" + header + "\n" + "-" * len(header))
    not_finite = []
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.dim, device=device, requires_grad=True)
        med, finite = time_side_by_side(layers, x, args.repeats, args.warmup, threads)
        row = f"{length:>6}" + "".join(f"{med[n]:>{widths[n]}.1f}" for n in names)
        row += "".join(f"{med[t] / med[o]:>{ratio_widths[t, o] - 1}.2f}x" for t, o in ratios)
        print(row, flush=True)
        not_finite += [f"{n} T={length} (output finite={f[0]}, grads finite={f[1]})"
                       for n, f in finite.items() if not all(f)]
    print("all outputs and gradients finite" if not not_finite else "NOT FINITE: " + "; ".join(not_finite))

    if args.memory_length:
        x = torch.randn(args.batch, args.memory_length, args.dim, device=device, requires_grad=True)
        how = "CUDA allocator peak" if device.type == "cuda" else "live CPU tensors, torch.profiler"
        print(f"\nPeak memory during one fwd+bwd at T={args.memory_length} ({how}):")
        for name, layer in layers.items():
            print(f"  {name:<9} {peak_memory_mib(layer, x):8.1f} MiB", flush=True)

    if args.check_semantics:
        check_semantics(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
