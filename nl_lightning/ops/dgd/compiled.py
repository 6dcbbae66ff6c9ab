"""``torch.compile``d DGD memory: the chunk kernel of ``chunk.py`` with each chunk step compiled.

Only the per-chunk step is compiled, not the loop over chunks: the loop carries the state from one
chunk to the next, and unrolling it would make compile time grow with the sequence length. The
final partial chunk is padded to full size by ``chunk_dgd_memory``, so one graph serves every
chunk of a sequence (a new (B, H, C, D) shape, or switching grad mode, compiles once more).
Inductor needs a C++ compiler on CPU and Triton on GPU.
"""

from __future__ import annotations

import torch

from nl_lightning.ops.dgd.chunk import CHUNK_STEPS, chunk_dgd_memory

_compiled_steps = {}


def _compiled_step(kind: str):
    # Built on first use so importing the package never touches the compiler stack.
    if kind not in _compiled_steps:
        _compiled_steps[kind] = torch.compile(CHUNK_STEPS[kind], dynamic=False, fullgraph=True)
    return _compiled_steps[kind]


def compiled_dgd_memory(q, k, v, eta, alpha, start, *, kind: str, chunk_size: int, rule="dgd", target="self"):
    """Same arguments, returns and semantics as ``chunk_dgd_memory``; each chunk step is compiled
    (the write rule and target are constants of the traced graph: one compile per choice)."""
    step = _compiled_step(kind)
    return chunk_dgd_memory(
        q, k, v, eta, alpha, start, kind=kind, chunk_size=chunk_size, rule=rule, target=target, step=step
    )
