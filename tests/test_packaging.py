"""`nl_lightning.callbacks` is mapped from the top-level `callbacks/` folder; both install modes must ship it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "nl_lightning", "callbacks"]
IMPORT_CHECK = "import nl_lightning.callbacks as c; print(c.__file__); print(c.TensorBoardHint.__name__)"


def copy_sources(dest: Path) -> Path:
    """Build from a copy: the repository's own tree must not leak onto the import path."""
    dest.mkdir()
    for name in SOURCES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, dest / name)
    return dest


def run(*args: str, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def pip(*args: str, cwd: Path) -> str:
    return run(sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args, cwd=cwd)


def test_wheel_contains_and_imports_the_callbacks_package(tmp_path):
    source = copy_sources(tmp_path / "src")
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("nl_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nl_lightning/callbacks/__init__.py" in names
    from nl_lightning.ops.cpu_extension import OPS_DIR, SOURCES  # the C++ kernels, beside their ops

    for path in [*SOURCES, OPS_DIR / "cpu" / "common.h"]:
        assert f"nl_lightning/ops/{path.relative_to(OPS_DIR).as_posix()}" in names
    assert not any(name.startswith("callbacks/") for name in names)
    assert any(name.endswith("entry_points.txt") for name in names)

    site = tmp_path / "site"
    pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    shutil.rmtree(source)  # the installed wheel must stand on its own
    # PYTHONPATH puts the wheel's copy ahead of the editable install of the test environment.
    out = run(sys.executable, "-c", IMPORT_CHECK, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""})
    file, name = out.split()
    assert Path(file).is_relative_to(site / "nl_lightning" / "callbacks")
    assert name == "TensorBoardHint"


def test_editable_install_maps_the_callbacks_folder(tmp_path):
    source = copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path)
    # Reuse the test environment's packages (torch, lightning, setuptools) without its .pth files.
    purelib = Path(sysconfig.get_paths()["purelib"])
    (venv_site,) = venv.glob("lib/python*/site-packages")
    (venv_site / "test_env.pth").write_text(str(purelib) + "\n")
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "-q", "install", "--no-deps", "--no-build-isolation", "-e", str(source), cwd=tmp_path)
    out = run(str(python), "-c", IMPORT_CHECK, cwd=tmp_path)
    file, name = out.split()
    assert Path(file) == source / "callbacks" / "__init__.py"
    assert name == "TensorBoardHint"
    # Editable means live: a new callback module in callbacks/ is importable without reinstalling.
    (source / "callbacks" / "added_later.py").write_text("VALUE = 42\n")
    assert run(str(python), "-c", "from nl_lightning.callbacks.added_later import VALUE; print(VALUE)", cwd=tmp_path).strip() == "42"


@pytest.mark.parametrize("script", ["nl-lightning"])
def test_console_script_is_installed(script):
    assert shutil.which(script, path=str(Path(sys.executable).parent)) is not None
