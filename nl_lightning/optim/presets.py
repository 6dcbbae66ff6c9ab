"""Named configurations of ``NestedOptimizer`` (SPEC §4): the baseline, collab5, and use cases.

The numbers are starting points chosen from the seed's description, not tuned results:

============  ====================  ========  ============  ===========  =====  ===============
preset        periods (levels)      bridges   gate          γ up / down  λ      pull w_k (F…US)
============  ====================  ========  ============  ===========  =====  ===============
google3       1, 10, 100 (F, M, S)  2 adj.    fixed linear  0.1 / 0.1    1      ½, ½ (M, S)
collab5       1, 5, 25, 125, 625    4 + 5     adaptive      0.1 / 0.1    1      ¼ each
adaptability  as collab5            4 + 5     adaptive      0.15 / 0.05  0.1    .4 .3 .2 .1
balanced      as collab5            4 + 5     adaptive      0.1 / 0.125  3      ¼ each
retention     as collab5            4 + 5     adaptive      0.05 / 0.2   10     .1 .2 .3 .4
============  ====================  ========  ============  ===========  =====  ===============

- λ spans the seed's sweep (0.1–20) on a log scale: 1 is neutral; trend forecasting
  (``adaptability``) sits at the plastic end (0.1); medical diagnosis (``retention``) at 10, the
  high-λ regime where the seed reports bridges keep accuracy (its sweep's 5 and 20), and where
  ``lr · λ < 1`` still holds for SGD learning rates below 0.1; safety-critical (``balanced``)
  at 3 ≈ √(1·10), between neutral and retention because it needs both.
- The pull weights w_k (levels F…US, normalised to sum 1) decide *which* slower levels the live
  weights are held to: the fast ones for adaptability, the slow ones for retention.
- γ up (fast → slow) consolidates, γ down (slow → fast) recalls. Retention recalls harder
  (0.2 down) and consolidates gently (0.05 up) so slow levels stay slow; adaptability the other
  way round. With 4 bridges into the busiest levels the sums stay ≤ 0.65 < 1 (contraction).
- Gate: sharpness 4 for all (threshold 1 when ``gate="static"``; see ``NestedOptimizer``);
  google3 has no gate and no normalisation (the linear transfer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nl_lightning.optim.bridges import default_bridges, default_level_names

GATES = ("adaptive", "static", "fixed")


@dataclass(frozen=True)
class NestedPreset:
    """Everything a preset fixes. ``NestedOptimizer`` arguments override single fields."""

    periods: tuple[int, ...]
    level_names: tuple[str, ...]
    bridges: tuple[str, ...] | Mapping[str, float]
    transfer_up: float
    transfer_down: float
    reg: float
    reg_weights: tuple[float, ...]  # one per slower level (1 … K−1), normalised to sum 1
    gate: str


def _derived(periods: Sequence[int], **fields) -> NestedPreset:
    """A preset for any number of levels: default names, adjacent + skip bridges, uniform pull."""
    names = default_level_names(len(periods))
    bridges = tuple(f"{names[i]}-{names[j]}" for i, j in default_bridges(len(periods)))
    values = dict(transfer_up=0.1, transfer_down=0.1, reg=1.0, reg_weights=(1.0,) * (len(periods) - 1), gate="adaptive")
    return NestedPreset(tuple(periods), names, bridges, **{**values, **fields})


_FIVE = (1, 5, 25, 125, 625)
PRESETS: dict[str, NestedPreset] = {
    "google3": _derived((1, 10, 100), gate="fixed"),
    "collab5": _derived(_FIVE),
    "adaptability": _derived(_FIVE, transfer_up=0.15, transfer_down=0.05, reg=0.1, reg_weights=(4.0, 3.0, 2.0, 1.0)),
    "balanced": _derived(_FIVE, transfer_up=0.1, transfer_down=0.125, reg=3.0),
    "retention": _derived(_FIVE, transfer_up=0.05, transfer_down=0.2, reg=10.0, reg_weights=(1.0, 2.0, 3.0, 4.0)),
}


def resolve_preset(preset: str | None, **overrides) -> NestedPreset:
    """The preset (``collab5`` when None) with every non-None override applied, validated.

    Overriding ``periods`` with a different number of levels drops the preset's per-level fields
    (names, bridges, pull weights) for the defaults of that many levels unless they are given too.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or leave it None")
    base = PRESETS[preset or "collab5"]
    periods = overrides.get("periods")
    if periods is not None and len(periods) != len(base.periods):
        derived = _derived(periods)
        base = NestedPreset(
            tuple(periods), derived.level_names, derived.bridges, base.transfer_up, base.transfer_down,
            base.reg, derived.reg_weights, base.gate,
        )
    fields = {key: value for key, value in overrides.items() if value is not None}
    for key in ("periods", "level_names", "reg_weights"):
        if key in fields:
            fields[key] = tuple(fields[key])
    if "bridges" in fields and not isinstance(fields["bridges"], Mapping):
        fields["bridges"] = tuple(fields["bridges"])
    config = NestedPreset(**{**base.__dict__, **fields})
    _validate(config)
    return config


def _validate(config: NestedPreset) -> None:
    periods, names = config.periods, config.level_names
    if not periods or periods[0] != 1:
        raise ValueError(
            f"levels {list(periods)} must start with period 1 (level 0 is the live weights, updated every step)"
        )
    if any(not isinstance(p, int) or p <= 0 for p in periods) or list(periods) != sorted(set(periods)):
        raise ValueError(f"levels {list(periods)} must be strictly increasing positive integers (fastest first)")
    if len(names) != len(periods) or len(set(names)) != len(names):
        raise ValueError(
            f"level_names {list(names)} must be {len(periods)} distinct names, one per level {list(periods)}"
        )
    if any(not name or "-" in name or ">" in name for name in names):
        raise ValueError(f"level_names {list(names)} must be non-empty and free of '-' and '>' (bridge syntax)")
    if len(config.reg_weights) != len(periods) - 1 or any(not w >= 0 for w in config.reg_weights):
        raise ValueError(
            f"reg_weights {list(config.reg_weights)} must be {len(periods) - 1} non-negative numbers, one per level "
            f"{list(names[1:])}"
        )
    if len(periods) > 1 and sum(config.reg_weights) <= 0:
        raise ValueError("reg_weights sum to 0; give at least one slower level a positive weight (or set reg=0)")
    if not config.reg >= 0:
        raise ValueError(f"reg must be >= 0, got {config.reg}")
    if config.gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {config.gate!r}")
