"""Build a byte-level corpus once: text files → memory-mapped uint8 arrays split by file.

Layout under ``<data_dir>/<corpus_name>/``: ``train.bin``, ``val.bin`` (raw bytes) and
``meta.json`` (which files went where and with which settings). A corpus is rebuilt only when
its sources or settings change.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CorpusSpec:
    """What to build: the files, the validation share, and an optional size cap."""

    files: tuple[str, ...]
    val_fraction: float
    max_bytes: int | None

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self) | {"version": _FORMAT_VERSION}).encode())
        for path in self.files:
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]


def stdlib_python_files() -> list[str]:
    """The Python standard library's ``.py`` sources: text that exists on every machine with Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def resolve_paths(patterns: list[str]) -> list[str]:
    """Expand files, directories (recursively, all files) and globs; every pattern must match."""
    files: set[str] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = glob.glob(expanded, recursive=True)
        if not matches:
            raise FileNotFoundError(
                f"no file matches {pattern!r} (relative paths resolve against {os.getcwd()}); "
                "check the path, or quote a glob such as 'texts/**/*.txt'"
            )
        for match in matches:
            if os.path.isdir(match):
                files.update(str(p) for p in Path(match).rglob("*") if p.is_file())
            else:
                files.add(os.path.abspath(match))
    return sorted(files)


def _file_rank(path: str) -> float:
    """A stable pseudo-random number in [0, 1) per file name: decides split and cap order."""
    name = os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path)
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16) / 16**12


def assign_splits(spec: CorpusSpec) -> dict[str, list[str]]:
    """Deterministic split by file: a file is in val when its rank is below ``val_fraction``.

    Files are taken in rank order until ``max_bytes`` is reached, so a cap keeps a mix of files
    rather than the alphabetically first ones.
    """
    ranked = sorted(spec.files, key=_file_rank)
    if spec.max_bytes is not None:
        kept, total = [], 0
        for path in ranked:
            if total >= spec.max_bytes:
                break
            kept.append(path)
            total += os.path.getsize(path)
        ranked = kept
    if len(ranked) < 2:
        raise ValueError(
            f"the corpus has {len(ranked)} file(s) but train/val are split by file and need at least 2; "
            "give more files (or a directory/glob), or raise max_bytes"
        )
    val = [p for p in ranked if _file_rank(p) < spec.val_fraction] or ranked[:1]
    train = [p for p in ranked if p not in set(val)]
    if not train:
        train, val = val[1:], val[:1]
    return {"train": sorted(train), "val": sorted(val)}


def build_corpus(spec: CorpusSpec, out_dir: str | Path) -> Path:
    """Write ``train.bin``/``val.bin``/``meta.json`` into ``out_dir`` unless an identical build exists."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == spec.fingerprint:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(spec)
    sizes = {}
    for split, files in splits.items():
        # Write to a temporary name and rename, so an interrupted build never looks complete. The
        # name is this build's own: sweeps start several workers at once on a fresh checkout, and
        # each builds the same files (identical bytes; the last rename wins).
        tmp = _temporary(out_dir, f"{split}.bin")
        with open(tmp, "wb") as sink:
            for path in files:
                with open(path, "rb") as source:
                    sink.write(source.read())
        sizes[split] = tmp.stat().st_size
        os.replace(tmp, out_dir / f"{split}.bin")
    if sum(sizes.values()) == 0:
        raise ValueError(f"the corpus is empty: its {len(spec.files)} file(s) contain 0 bytes; give files with text")
    meta = {**asdict(spec), "fingerprint": spec.fingerprint, "sizes": sizes, "splits": splits}
    # meta.json last, and whole: a concurrent reader that finds it finds complete splits.
    tmp = _temporary(out_dir, "meta.json")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return out_dir


def _temporary(out_dir: Path, name: str) -> Path:
    """A new empty file beside ``name`` in ``out_dir`` that no other build uses."""
    handle, path = tempfile.mkstemp(dir=out_dir, prefix=f"{name}.", suffix=".tmp")
    os.close(handle)
    return Path(path)


def open_split(corpus_dir: str | Path, split: str) -> np.ndarray:
    path = Path(corpus_dir) / f"{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")
