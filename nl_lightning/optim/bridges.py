"""Knowledge bridges between the levels of a ``NestedOptimizer`` (SPEC §4, seed 000).

A bridge i→j moves level j's weights toward level i's when the slower of the two levels ticks:

    θ_j ← θ_j + γ_ij · g_ij · N_j(θ_i − θ_j)

- ``N_j`` (``normalized_message``) is a LayerNorm-style normalisation of the message, per
  parameter tensor (subtract the mean, divide by the standard deviation), rescaled to level j's
  own update scale: the EMA of the RMS of level j's updates of that tensor. A transfer therefore
  moves level j by about γ·g of one of its own updates however far apart the levels are — the
  seed's "LayerNorm preserves timescale character".
- ``g_ij = σ(a_ij (s_i − τ_ij))`` (``bridge_gate``) opens on the gradient surprise of the source,
  ``s_i = ‖ḡ_i − m_i‖ / (‖m_i‖ + ε)`` (ḡ_i: the gradient level i summed since its previous tick,
  m_i: its momentum's prediction of it). With ``gate="fixed"`` there is no gate and no
  normalisation: ``θ_j ← θ_j + γ_ij (θ_i − θ_j)``, the linear transfer of the 3-level baseline.

Topology follows the seed: adjacent bridges plus "skip" bridges between non-adjacent levels;
for five levels (UF, F, M, S, US) that is 4 + 5 = 9 undirected bridges and every level reaches
every other in at most 2 hops.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

_NAMED_LEVELS = {
    3: ("F", "M", "S"),  # the 3-level baseline: fast, medium, slow
    5: ("UF", "F", "M", "S", "US"),  # ultra-fast … ultra-slow
}


@dataclass(frozen=True)
class Bridge:
    """A directed bridge ``source → target`` with transfer strength γ (``transfer``)."""

    source: int
    target: int
    transfer: float

    @property
    def slower(self) -> int:
        """The endpoint whose tick fires the bridge (levels are ordered fastest first)."""
        return max(self.source, self.target)

    def name(self, level_names: Sequence[str]) -> str:
        return f"{level_names[self.source]}->{level_names[self.target]}"


def default_level_names(num_levels: int) -> tuple[str, ...]:
    """UF, F, M, S, US for five levels; F, M, S for three; L0, L1, … otherwise."""
    return _NAMED_LEVELS.get(num_levels, tuple(f"L{k}" for k in range(num_levels)))


def adjacent_bridges(num_levels: int) -> list[tuple[int, int]]:
    """Undirected bridges between neighbouring levels: (0, 1), (1, 2), …"""
    return [(k, k + 1) for k in range(num_levels - 1)]


def non_adjacent_bridges(num_levels: int, max_span: int | None = None) -> list[tuple[int, int]]:
    """Undirected skip bridges (i, j) with ``2 ≤ j − i ≤ max_span``.

    ``max_span`` defaults to ``num_levels − 2``: every skip except fastest↔slowest, which for
    five levels gives the seed's five (UF–M, UF–S, F–S, F–US, M–US) and a diameter of 2.
    """
    max_span = num_levels - 2 if max_span is None else max_span
    return [(i, j) for i in range(num_levels) for j in range(i + 2, min(i + max_span, num_levels - 1) + 1)]


def default_bridges(num_levels: int) -> list[tuple[int, int]]:
    """Adjacent plus non-adjacent bridges: 2 (adjacent only) for 3 levels, 9 for 5 levels."""
    return adjacent_bridges(num_levels) + non_adjacent_bridges(num_levels)


def max_path_length(num_levels: int, bridges: Sequence[tuple[int, int]]) -> float:
    """Longest shortest path (in hops) between two levels of the undirected bridge graph.

    Breadth-first search from every level; ``math.inf`` if some level cannot reach another.
    """
    neighbours: dict[int, set[int]] = {k: set() for k in range(num_levels)}
    for i, j in bridges:
        neighbours[i].add(j)
        neighbours[j].add(i)
    longest = 0
    for start in range(num_levels):
        hops = {start: 0}
        queue = deque([start])
        while queue:
            level = queue.popleft()
            for other in neighbours[level] - hops.keys():
                hops[other] = hops[level] + 1
                queue.append(other)
        if len(hops) < num_levels:
            return math.inf
        longest = max(longest, *hops.values())
    return longest


def undirected(bridges: Sequence[Bridge]) -> list[tuple[int, int]]:
    """The undirected pairs (fast, slow) covered by a list of directed bridges."""
    return sorted({(min(b.source, b.target), b.slower) for b in bridges})


def parse_bridges(
    spec: Sequence[str] | Mapping[str, float],
    level_names: Sequence[str],
    transfer_up: float,
    transfer_down: float,
) -> tuple[Bridge, ...]:
    """Directed bridges from ``"A-B"`` (both directions) or ``"A->B"`` (one direction) entries.

    A list takes γ from ``transfer_up`` (fast → slow, consolidation) and ``transfer_down``
    (slow → fast); a mapping gives each entry its own γ. Levels are named (``"UF-M"``) or indexed
    (``"0-2"``).
    """
    entries = spec.items() if isinstance(spec, Mapping) else ((entry, None) for entry in spec)
    index = {name: k for k, name in enumerate(level_names)}

    def level(token: str, entry: str) -> int:
        token = token.strip()
        if token in index:
            return index[token]
        if token.isdigit() and int(token) < len(level_names):
            return int(token)
        raise ValueError(f"bridge {entry!r} names unknown level {token!r}; levels are {list(level_names)}")

    bridges: dict[tuple[int, int], Bridge] = {}
    for entry, transfer in entries:
        directed = "->" in entry and "<->" not in entry
        parts = entry.split("->" if directed else ("<->" if "<->" in entry else "-"))
        if len(parts) != 2:
            raise ValueError(f"bridge {entry!r} is not of the form 'A-B' (both ways) or 'A->B' (one way)")
        i, j = level(parts[0], entry), level(parts[1], entry)
        if i == j:
            raise ValueError(f"bridge {entry!r} connects level {level_names[i]} to itself; remove it")
        for source, target in [(i, j)] if directed else [(i, j), (j, i)]:
            gamma = transfer if transfer is not None else (transfer_up if target > source else transfer_down)
            if not gamma >= 0:
                raise ValueError(f"bridge {entry!r} has transfer strength {gamma}; use a value in [0, 1)")
            if (source, target) in bridges:
                raise ValueError(f"bridge {level_names[source]}->{level_names[target]} is listed twice in {spec!r}")
            bridges[(source, target)] = Bridge(source, target, float(gamma))
    return tuple(sorted(bridges.values(), key=lambda b: (b.slower, min(b.source, b.target), b.source)))


def check_contraction(bridges: Sequence[Bridge], level_names: Sequence[str]) -> None:
    """Raise unless every level receives a total transfer strength ``Σ_i γ_ij < 1``.

    For the linear transfer this makes each firing a convex combination of the levels (a
    contraction); for the normalised one it keeps the total transfer into a level below one of
    its own updates, so bridges can never outrun the level they write into.
    """
    for target, name in enumerate(level_names):
        incoming = [b for b in bridges if b.target == target]
        total = sum(b.transfer for b in incoming)
        if total >= 1:
            terms = ", ".join(f"{b.name(level_names)}: {b.transfer:g}" for b in incoming)
            raise ValueError(
                f"bridges into level {name} do not contract: Σγ = {total:g} ≥ 1 ({terms}); lower "
                f"transfer_up/transfer_down (or the strengths of these bridges) so they sum below 1, "
                f"or drop some bridges into {name}"
            )


def bridge_gate(surprise: torch.Tensor, sharpness: float | torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``σ(a (s − τ))``: near 0 below the threshold, ½ at it, near 1 well above it."""
    return torch.sigmoid(sharpness * (surprise - threshold))


def normalized_message(message: torch.Tensor, scale: torch.Tensor | float, eps: float = 1e-12) -> torch.Tensor:
    """LayerNorm-style ``scale · (x − mean x) / sqrt(var x + eps)`` over the whole tensor.

    Its RMS is ``scale`` whatever the size of ``x`` (unless var x ≲ eps, where it fades to 0;
    a constant or single-element message carries nothing).
    """
    centred = message - message.mean()
    return centred * (scale * torch.rsqrt(centred.square().mean() + eps))
