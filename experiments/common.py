"""What the studies share: where they write, and the options every study takes for it."""

from __future__ import annotations

import argparse
from pathlib import Path

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
