"""How large do the memories' states get on adversarial streams, per write rule and target?

    .venv/bin/python -m experiments.write_stability        # writes docs/data/write_stability.csv

Each memory (HOPE's and Titans' shapes: 4 heads of 48, MLP hidden 48) reads ``--length`` tokens of
random unit keys and queries and standard-normal values with nothing forgotten (α = 1, the worst
case for growth) at several steps, chunk sizes and targets, and the table reports the largest
Frobenius norm of each weight of the final state and the largest read-out. Rules:

* ``delta``: the normalised delta rule (``ops/dgd/naive.py``), the models' default;
* ``dgd``: the paper's DGD rule with the step the models gave it before (η = 0.5·σ/C, so the
  largest η here is 0.5 / C) and with the same one-shot steps as the delta rule.

The self-made target v̂ = M(v) feeds the state back into its own target; this table is the
measurement behind keeping ``memory_target="value"`` as the default (docs/results.md).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.common import DATA_DIR
from nl_lightning.ops.dgd import dgd_memory

COLUMNS = ("kind", "rule", "target", "step", "chunk_size", "finite", "state_norm_w1", "state_norm_w2", "max_readout")


def run_case(kind: str, rule: str, target: str, step: float, chunk_size: int, length: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 4, length, 48)
    q, k = (F.normalize(torch.randn(*shape, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(*shape, generator=gen)
    if kind == "linear":
        weights = (torch.eye(48).repeat(4, 1, 1),)
    else:
        weights = (0.1 * torch.randn(4, 48, 48, generator=gen) / 48**0.5, torch.randn(4, 48, 48, generator=gen) / 48**0.5)
    o, state = dgd_memory(q, k, v, torch.full(shape[:3], step), torch.ones(shape[:3]), weights, kind=kind,
                          chunk_size=chunk_size, impl="auto", rule=rule, target=target)
    norms = [w.flatten(-2).norm(dim=-1).max().item() for w in state.weights]
    finite = bool(torch.isfinite(o).all()) and all(math.isfinite(n) for n in norms)
    return {"kind": kind, "rule": rule, "target": target, "step": step, "chunk_size": chunk_size, "finite": finite,
            "state_norm_w1": norms[0], "state_norm_w2": norms[1] if len(norms) > 1 else float("nan"),
            "max_readout": o.abs().max().item()}


def cases():
    for kind in ("linear", "mlp"):
        for target in ("value", "self"):
            for chunk_size in (1, 64):
                for step in (0.5, 1.0):
                    yield kind, "delta", target, step, chunk_size
                yield kind, "dgd", target, 0.5 / chunk_size, chunk_size  # the old default cap
                if chunk_size > 1:
                    yield kind, "dgd", target, 0.5, chunk_size  # a one-shot-sized DGD step (the cap at C = 1)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA_DIR / "write_stability.csv")
    args = parser.parse_args(argv)
    rows = [run_case(*case, args.length, args.seed) for case in cases()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.4g}" if isinstance(value, float) else value for key, value in row.items()})
    print("| kind | rule | target | step | C | finite | ‖W1‖ | ‖W2‖ | max ‖read-out‖ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['rule']} | {r['target']} | {r['step']:.3g} | {r['chunk_size']} | "
              f"{'yes' if r['finite'] else '**no**'} | {r['state_norm_w1']:.3g} | {r['state_norm_w2']:.3g} | "
              f"{r['max_readout']:.3g} |")
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
