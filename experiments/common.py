"""What the studies (and the benchmarks) share: where they write, the options every study takes for
it, and ``KEY=VALUE`` command-line arguments."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import bootstrap

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "docs" / "data"


def add_output_arguments(parser: argparse.ArgumentParser, name: str, merges: str) -> None:
    """``--out`` (``docs/data/<name>.csv``), ``--logs`` (``runs/<name>``), ``--table`` and ``--merge``
    (``merges``: what the merged CSVs are, for the help)."""
    parser.add_argument("--out", type=Path, default=DATA_DIR / f"{name}.csv")
    parser.add_argument("--logs", type=Path, default=Path("runs") / name)
    parser.add_argument("--table", action="store_true", help="print the table(s) of --out and exit")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="CSV",
                        help=f"write the rows of these CSVs ({merges}) to --out")


def key_values(items: list[str], option: str, example: str) -> dict:
    """``KEY=VALUE`` arguments of ``option`` as a dict, each value read as YAML (``8`` an int,
    ``true`` a bool, ``[a, b]`` a list); a malformed one exits naming it and ``example``."""
    parsed = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise SystemExit(f"{option} {item!r}: write KEY=VALUE, e.g. {option} {example}")
        parsed[key] = yaml.safe_load(value)
    return parsed


def paired_interval(differences: list[float]) -> tuple[float, float]:
    """Bootstrap 95% interval of the mean of per-seed paired differences (percentile method)."""
    if len(differences) < 2 or len(set(differences)) == 1:
        return (differences[0], differences[0]) if differences else (math.nan, math.nan)
    result = bootstrap((np.array(differences),), np.mean, confidence_level=0.95, n_resamples=10_000,
                       method="percentile", random_state=0)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
