"""Which package each layer may import, read from the source with ``ast`` (imports inside
functions count too).

Layers, bottom up: the merging core (``livar_merge``'s top-level modules and
``livar_merge.aggregation``), the flwr-free runtime (``livar_merge.federated``), the Flower
package (``livar_merge.flower``), then the applications (``livar_calib``, ``analysis``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO as ROOT

CORE = [
    p
    for p in (ROOT / "livar_merge").glob("*.py")
    if p.name != "__init__.py"  # the package's public API re-exports every layer lazily
] + sorted((ROOT / "livar_merge" / "aggregation").rglob("*.py"))
RUNTIME = sorted((ROOT / "livar_merge" / "federated").rglob("*.py"))
FLOWER = sorted((ROOT / "livar_merge" / "flower").rglob("*.py"))
CALIB = sorted((ROOT / "livar_calib").rglob("*.py"))
ANALYSIS = sorted((ROOT / "analysis").rglob("*.py"))
ALL = [*CORE, *RUNTIME, *FLOWER, *CALIB, *ANALYSIS]


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from`` statement of ``path`` names (relative resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def offenders(paths: list[Path], forbidden: tuple[str, ...], allow: set[str] = frozenset()):
    found = []
    for path in paths:
        rel = str(path.relative_to(ROOT))
        if rel in allow:
            continue
        for module in sorted(imported_modules(path)):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{rel} imports {module}")
    return found


def test_the_layers_exist():
    assert len(CORE) >= 8 and len(RUNTIME) >= 10 and len(FLOWER) >= 4 and CALIB and ANALYSIS


def test_merging_core_imports_no_runtime_or_application():
    forbidden = ("livar_merge.federated", "livar_merge.flower", "livar_calib", "analysis", "flwr")
    assert offenders(CORE, forbidden) == []


def test_nothing_outside_the_flower_package_imports_flwr():
    assert offenders([*CORE, *RUNTIME, *CALIB, *ANALYSIS], ("flwr",)) == []
    # Ray has one home outside Flower: the Ray engine of livar-calibrate/livar-sweep (lazily)
    allow = {"livar_merge/federated/ray_engine.py"}
    assert offenders([*CORE, *RUNTIME, *CALIB, *ANALYSIS], ("ray",), allow) == []


def test_runtime_imports_the_flower_package_only_from_the_cli():
    # livar-fed --engine flower starts the Simulation Engine; nothing else may reach Flower
    allow = {"livar_merge/federated/cli.py"}
    assert offenders(RUNTIME, ("livar_merge.flower",), allow) == []
    assert offenders(RUNTIME, ("livar_calib", "analysis")) == []


def test_calibration_and_analysis_stay_above_the_runtime():
    assert offenders(CALIB, ("analysis", "livar_merge.flower")) == []
    assert offenders([*CORE, *RUNTIME, *FLOWER], ("livar_calib", "analysis")) == []


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_local_import_of_a_module_imported_at_the_top(path):
    """Lazy imports are for heavy packages; a module already imported at the top of the file
    is never imported again inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module)
    repeated = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    repeated += [a.name for a in inner.names if a.name in top]
                elif isinstance(inner, ast.ImportFrom) and inner.module in top:
                    repeated.append(inner.module)
    assert repeated == [], f"{path.name}: imported at the top and again in a function"
