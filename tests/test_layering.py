"""The package's layering (SPEC §1), read from the source: the dependency direction, plain PyTorch
below the Lightning layer, models that know only the ops' entry points, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "nl_lightning"
# What each layer may import from the package (itself always): cli → modules → models → ops,
# modules → metrics; data, metrics and evaluation sit beside them.
ALLOWED = {
    "ops": set(),
    "models": {"ops"},
    "optim": set(),
    "metrics": set(),
    "data": set(),
    "checkpoint_io": set(),
    "strategies": {"checkpoint_io"},
    "evaluation": {"models", "modules", "data", "metrics"},
    "modules": {"models", "metrics", "ops", "optim", "data", "callbacks", "checkpoint_io"},
}
PLAIN_PYTORCH = ("ops", "models", "optim")  # no Lightning import: they work outside a Trainer and in DeepSpeed
OP_ENTRY_POINTS = {"nl_lightning.ops", "nl_lightning.ops.conv", "nl_lightning.ops.dgd", "nl_lightning.ops.projection",
                   "nl_lightning.ops.titans"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as a and as a.b), relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
IMPORTS = {name: imports(path) for name, path in MODULES.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "nl_lightning" else None


def test_every_layer_imports_only_the_layers_below_it():
    layers = ({layer(name) for name in MODULES} | {"callbacks"}) - {None}  # callbacks/ is mapped into the package
    wrong = [f"{name} imports {target}" for name, found in IMPORTS.items() if layer(name) in ALLOWED
             for target in found if layer(target) in layers - {layer(name)} - ALLOWED[layer(name)]]
    assert not wrong, "\n".join(wrong)


def test_models_ops_and_optim_are_plain_pytorch():
    wrong = [f"{name} imports {target}" for name, found in IMPORTS.items() if layer(name) in PLAIN_PYTORCH
             for target in found if target.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not wrong, "\n".join(wrong)


def test_models_import_only_the_ops_entry_points():
    wrong = [f"{name} imports {target}" for name, found in IMPORTS.items() if layer(name) == "models"
             for target in found if target.startswith("nl_lightning.ops") and target in MODULES
             and target not in OP_ENTRY_POINTS]
    assert not wrong, "models must call the ops through their entry points:\n" + "\n".join(wrong)


def test_nothing_in_the_package_the_benchmarks_or_the_experiments_imports_the_cli():
    scripts = [*(REPO_ROOT / "benchmarks").rglob("*.py"), *(REPO_ROOT / "experiments").rglob("*.py")]
    sources = {**MODULES, **{module_name(p): p for p in scripts}}
    assert {"benchmarks.throughput", "experiments.lm_compare"} <= set(sources)
    wrong = [name for name, path in sources.items() if name != "nl_lightning.cli"
             and "nl_lightning.cli" in imports(path)]
    assert not wrong, f"{wrong} import nl_lightning.cli; build through the public API instead"


def test_no_import_cycle_between_modules():
    # A package importing its own submodules (an __init__ re-exporting) is not a cycle.
    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    edges = {name: {t for t in found if t in MODULES and t != name and not related(name, t)}
             for name, found in IMPORTS.items()}
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in edges[node]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)
