"""benchmarks/ and experiments/ are packages whose modules run as ``python -m <package>.<name>``:
no ``sys.path`` manipulation, every benchmark importable and runnable as a module."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import REPO_ROOT

SOURCES = sorted([*(REPO_ROOT / "benchmarks").glob("*.py"), *(REPO_ROOT / "experiments").glob("*.py")])
HELPERS = {"__init__", "devices", "timing", "common", "continual_plots", "recipes"}  # imported by the others, not run
RUNNABLE = [path for path in SOURCES if path.stem not in HELPERS]


def sys_path_uses(path: Path) -> list[str]:
    """Where ``path`` reads or changes ``sys.path`` (``sys.path.insert``, ``from sys import path``, ...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"{path.name}:{node.lineno}: sys.path")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            found.append(f"{path.name}:{node.lineno}: from sys import path")
    return found


def test_the_sources_are_found():
    names = {path.stem for path in SOURCES}
    assert {"throughput", "timing", "lm_compare", "continual_sweep", "longctx_eval", "recall"} <= names


def test_no_module_manipulates_sys_path():
    found = [use for path in SOURCES for use in sys_path_uses(path)]
    assert not found, "run the module as `python -m <package>.<name>` from the repository root instead:\n" + \
        "\n".join(found)


def test_the_check_catches_a_sys_path_hack(tmp_path):
    script = tmp_path / "hack.py"
    script.write_text("import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path(__file__).parent))\n")
    assert sys_path_uses(script) == ["hack.py:3: sys.path"]


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: f"{p.parent.name}.{p.stem}")
def test_every_runnable_module_imports_and_has_a_main_guard(path):
    module = importlib.import_module(f"{path.parent.name}.{path.stem}")
    assert callable(module.main)
    guards = [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.If)
              and ast.unparse(node.test) == "__name__ == '__main__'"]
    assert len(guards) == 1, f"{path.name}: one `if __name__ == \"__main__\":` block runs main()"


def test_a_benchmark_runs_as_a_module_from_the_repository_root():
    done = subprocess.run([sys.executable, "-m", "benchmarks.conv_layout", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ") and "--repeats" in done.stdout
