"""Under torch.autocast the memory kernels are float32 operators (``nl_lightning.ops.autocast``):
mixed-dtype inputs are accepted, computed in float32 with autocast off, and returned as float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nl_lightning.ops.autocast import upcast_half
from nl_lightning.ops.dgd import dgd_memory
from nl_lightning.ops.titans import MemoryState, titans_memory

B, H, T, D = 2, 2, 12, 8


def sequence(names, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gates = {"theta": (0.05, 0.3), "eta": (0.1, 0.5), "alpha": (0.01, 0.2)}
    out = {}
    for name in names:
        if name in gates:
            low, high = gates[name]
            out[name] = (low + (high - low) * torch.rand(B, H, T, generator=gen)).to(dtype)
        else:
            x = torch.randn(B, H, T, D, generator=gen)
            out[name] = (F.normalize(x, dim=-1) if name == "k" else x).to(dtype)
    return out


def weights(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(0.3 * torch.randn(H, D, D, generator=gen) for _ in range(n))


def half_of(seq):
    """The layer's situation under autocast: projections in bfloat16, gates and weights float32."""
    return {n: x.bfloat16() if n in ("q", "k", "v") else x for n, x in seq.items()}


def as_float32(seq):
    return {n: x.float() for n, x in seq.items()}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_titans_memory_under_autocast_takes_mixed_dtypes_and_computes_in_float32(kind):
    seq = half_of(sequence(["q", "k", "v", "theta", "eta", "alpha"]))
    ws = weights(1 if kind == "linear" else 2)
    with pytest.raises(ValueError, match="bfloat16"):  # outside autocast a dtype mix is still an error
        titans_memory(**seq, weights=ws, kind=kind, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = titans_memory(**seq, weights=ws, kind=kind, chunk_size=4)
    expected_y, expected_state = titans_memory(**as_float32(seq), weights=ws, kind=kind, chunk_size=4)
    assert y.dtype == torch.float32 and all(s.dtype == torch.float32 for s in (*state.weights, *state.momentum))
    torch.testing.assert_close(y, expected_y, atol=0, rtol=0)  # bit-identical: no bfloat16 matmul inside
    for a, e in zip((*state.weights, *state.momentum), (*expected_state.weights, *expected_state.momentum)):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_titans_memory_under_autocast_upcasts_a_passed_state():
    seq = sequence(["q", "k", "v", "theta", "eta", "alpha"])
    _, state = titans_memory(**seq, weights=weights(1), kind="linear", chunk_size=4)
    half_state = MemoryState(*(tuple(s.bfloat16() for s in part) for part in state))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = titans_memory(**seq, kind="linear", chunk_size=4, state=half_state)
    expected, _ = titans_memory(**seq, kind="linear", chunk_size=4, state=upcast_half(half_state))
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_dgd_memory_under_autocast_takes_mixed_dtypes_and_computes_in_float32(kind):
    seq = half_of(sequence(["q", "k", "v", "eta", "alpha"]))
    ws = weights(1 if kind == "linear" else 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, state = dgd_memory(**seq, weights=ws, kind=kind, chunk_size=4)
    expected_o, expected_state = dgd_memory(**as_float32(seq), weights=ws, kind=kind, chunk_size=4)
    assert o.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state.weights)
    torch.testing.assert_close(o, expected_o, atol=0, rtol=0)
    for a, e in zip(state.weights, expected_state.weights):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_upcast_half_keeps_structure_and_other_dtypes():
    state = MemoryState((torch.zeros(2, dtype=torch.bfloat16),), (torch.zeros(2, dtype=torch.float16),))
    out = upcast_half([state, torch.zeros(1, dtype=torch.float64), 3, None])
    assert isinstance(out, list) and isinstance(out[0], MemoryState)
    assert out[0].weights[0].dtype == out[0].momentum[0].dtype == torch.float32
    assert out[1].dtype == torch.float64 and out[2:] == [3, None]
