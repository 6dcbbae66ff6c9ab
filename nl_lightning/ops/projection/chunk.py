"""HOPE's projection memories with chunk-parallel writes: the loop of ``naive.py``, each chunk's
write one kernel call for all four memories. Under the DGD rule that is ``shared_key.py``, which
does the key-only work once and builds no read-outs; under the delta rule, the DGD op's chunk
kernel."""

from __future__ import annotations

from nl_lightning.ops.autocast import float32_under_autocast
from nl_lightning.ops.projection.naive import projection_loop, write_through_dgd_op
from nl_lightning.ops.projection.shared_key import shared_key_mlp_update


@float32_under_autocast
def _shared_key_write(state, key, value, target, eta, alpha, rule):
    return shared_key_mlp_update(key, value, eta, alpha, tuple(state))


def chunk_projection_memories(x, weights, gate_bias, *, chunk_size: int, eta_scale: float, rule: str):
    write = _shared_key_write if rule == "dgd" else write_through_dgd_op("chunk")
    return projection_loop(x, weights, gate_bias, chunk_size=chunk_size, eta_scale=eta_scale, rule=rule, write=write)
