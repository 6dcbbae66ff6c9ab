"""Shared fixtures: small generated corpora and a helper that runs the real CLI."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests that also run on a GPU take ``device`` from this list: on a machine without CUDA the cuda
# case is reported as skipped, so a GPU run (``pytest -k cuda``) checks the same assertions there.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
ON_DEVICES = pytest.mark.parametrize("device", DEVICES)

# Two threads: the CI machine has 2 cores, and oversubscription makes tests slower, not faster.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    """A small corpus of 6 generated text files (~6 KB each), enough for a train/val split by file."""
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(6):
        lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(200)]
        (root / f"file_{i}.py").write_text("".join(lines))
    return root


def config_args(configs) -> list[str]:
    """``--config`` arguments for a recipe composition: its files, stacked in order."""
    return [arg for path in configs for arg in ("--config", str(path))]


def as_leaves(seq: dict, weights: tuple, device) -> tuple[dict, tuple]:
    """Op inputs drawn on the CPU (the same numbers on every device), moved to ``device`` as leaves
    that require grad."""
    seq = {n: x.to(device) for n, x in seq.items()}
    weights = tuple(w.to(device) for w in weights)
    for x in (*seq.values(), *weights):
        x.requires_grad_()
    return seq, weights


@pytest.fixture(scope="module")
def haystack_workdir(tmp_path_factory) -> Path:
    """A module-wide working directory with a small haystack corpus under texts/, so needle-in-a-
    haystack tasks never build the stdlib one; the tests run inside it."""
    path = tmp_path_factory.mktemp("haystack")
    texts = path / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"file_{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x + {j}\n" for j in range(300)))
    previous = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(previous)


@pytest.fixture
def triton_linear(monkeypatch):
    """The Triton implementation of the linear Titans memory, run by Triton's interpreter when
    there is no GPU (skips where triton is not installed)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; install the dev extra to test the Triton kernel")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are built and launched
    import functools

    from nl_lightning.ops.titans import titans_memory

    return functools.partial(titans_memory, impl="triton")


@pytest.fixture
def triton_device(monkeypatch):
    """Where Triton kernels run in this test: "cuda" on a GPU machine, else "cpu" under Triton's
    interpreter (skips where triton is not installed)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; install the dev extra to test the Triton kernels")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are jitted and launched
    return "cpu"


def changed_at(history: list[dict[str, torch.Tensor]], name: str, initial: torch.Tensor) -> list[int]:
    """1-based step numbers after which parameter ``name`` differs from its previous value
    (``history``: the parameters after each step), to compare update schedules."""
    previous, steps = initial, []
    for i, params in enumerate(history, start=1):
        if not torch.equal(params[name], previous):
            steps.append(i)
        previous = params[name]
    return steps


def reloaded(model, optimizer, build_model, build_optimizer):
    """A fresh model and optimizer restored from ``model``'s and ``optimizer``'s state dicts through
    ``torch.save`` / ``torch.load(weights_only=True)``, as a resumed run gets them."""
    import io

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = build_model()
    twin.load_state_dict(saved["model"])
    twin_optimizer = build_optimizer(twin)
    twin_optimizer.load_state_dict(saved["optimizer"])
    return twin, twin_optimizer


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (tiny models on a shared CPU: extra threads only
    spin and wait), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import a script that is not part of a package (a worker a test generates)."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def unbuildable_cpu_kernels(monkeypatch):
    """The fused CPU kernels as on a machine without a compiler: nothing built yet, and building
    raises the error ``cpu_extension.load_extension`` raises there."""
    from nl_lightning.ops import cpu_extension

    def no_compiler():
        raise RuntimeError("could not build the fused CPU memory kernels: no compiler.")

    monkeypatch.setattr(cpu_extension, "_extension", None)
    monkeypatch.setattr(cpu_extension, "_unavailable", None)
    monkeypatch.setattr(cpu_extension, "load_extension", no_compiler)


def on_one_and_two_threads(fn):
    """``[fn() with torch on 1 thread, fn() on 2 threads]``; the thread count is restored after."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)
