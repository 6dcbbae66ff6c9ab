"""``torch.compile``d chunk step for the Titans memory (CPU inductor or GPU inductor/Triton).

Only the per-chunk step (the state hand-over, ``chunk.linear_chunk_step`` /
``chunk.mlp_chunk_step``) is compiled, not the loop over chunks: the step has the same shapes
for every chunk (the last one is padded), so one graph serves any sequence length, whereas
compiling the loop would unroll it and recompile for every new number of chunks. The gate-only
coefficients and the read-outs of all chunks stay eager; they are a few large batched ops.

Compilation happens on first use and is cached for the process (dynamo also caches per input
shape), so importing this module costs nothing.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .chunk import chunk_coefficients, linear_chunk_step, mlp_chunk_step, run_chunks
from nl_lightning.ops.contract import MemoryState


@functools.lru_cache(maxsize=None)
def compiled_chunk_step(kind: str):
    """The compiled chunk step of one memory kind, built once per process."""
    return torch.compile(linear_chunk_step if kind == "linear" else mlp_chunk_step, fullgraph=True)


def compiled_titans_memory(q, k, v, theta, eta, alpha, start: MemoryState, *, kind: str, chunk_size: int):
    """Chunk-parallel Titans memory with a compiled chunk step; same contract as the chunk one."""
    C = min(chunk_size, q.shape[2])
    coefficients = chunk_coefficients(theta, eta, alpha, C)
    # Contiguous start state: the first chunk then has the same strides as every later one,
    # so the compiled step is not recompiled for the broadcast (stride-0) initial weights.
    # Likewise, the zero initial momentum is marked as requiring grad when anything does, so the
    # first chunk does not compile a separate graph for a constant input.
    tracked = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, theta, eta, alpha, *start.weights, *start.momentum)
    )

    def prepare(t: Tensor) -> Tensor:
        t = t.contiguous()
        return t.detach().requires_grad_() if tracked and not t.requires_grad else t

    start = MemoryState(*(tuple(prepare(t) for t in part) for part in start))
    return run_chunks(kind, q, k, v, coefficients, start, C, step=compiled_chunk_step(kind))
