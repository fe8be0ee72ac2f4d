"""Which layer may import which, read from the source with ``ast`` (imports inside functions
count too).

Layers, bottom up (the top-level packages ``livar_merge`` and ``livar_calib`` keep their names):

============  ===============================================================================
peft view     ``livar_merge/lora_view.py``: peft's names and LoRA operations (torch only)
core          ``livar_merge``'s other top-level modules: the merging maths, tables, signals
methods       ``livar_merge/aggregation``: the aggregation methods and their registry
tracking      ``livar_merge/tracking``: experiment trackers mirroring folders (core only)
runtime       ``livar_merge/federated``: flwr-free config, data, model, client, server, runs
engines       ``livar_merge/engines`` (in process, Ray) and ``livar_merge/flower`` (Flower)
apps          ``livar_merge/apps`` (livar-fed, livar-sweep, livar-export), ``livar_calib``,
              ``analysis``
============  ===============================================================================

A layer imports only the layers below it; flwr only in the Flower engine, Ray only in the Ray
engine (lazily).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO as ROOT

PACKAGE = ROOT / "livar_merge"
PEFT_VIEW = [PACKAGE / "lora_view.py"]
CORE = [
    p
    for p in PACKAGE.glob("*.py")
    if p.name not in ("__init__.py", "lora_view.py")  # __init__: the lazy public API
]
METHODS = sorted((PACKAGE / "aggregation").rglob("*.py"))
TRACKING = sorted((PACKAGE / "tracking").rglob("*.py"))
RUNTIME = sorted((PACKAGE / "federated").rglob("*.py"))
ENGINES = sorted((PACKAGE / "engines").rglob("*.py"))
FLOWER = sorted((PACKAGE / "flower").rglob("*.py"))
APPS = sorted((PACKAGE / "apps").rglob("*.py"))
CALIB = sorted((ROOT / "livar_calib").rglob("*.py"))
ANALYSIS = sorted((ROOT / "analysis").rglob("*.py"))
ALL = [
    *PEFT_VIEW,
    *CORE,
    *METHODS,
    *TRACKING,
    *RUNTIME,
    *ENGINES,
    *FLOWER,
    *APPS,
    *CALIB,
    *ANALYSIS,
]
# module prefixes of each layer
M_PEFT_VIEW = ("livar_merge.lora_view",)
M_METHODS = ("livar_merge.aggregation",)
M_TRACKING = ("livar_merge.tracking",)
M_RUNTIME = ("livar_merge.federated",)
M_ENGINES = ("livar_merge.engines", "livar_merge.flower")
M_APPS = ("livar_merge.apps", "livar_calib", "analysis")


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
    assert len(CORE) >= 8 and len(METHODS) >= 6 and len(RUNTIME) >= 10
    assert len(ENGINES) >= 2 and len(FLOWER) >= 4 and len(APPS) >= 5 and CALIB and ANALYSIS
    assert len(ALL) == len(set(ALL))  # no module in two layers
    every = {p for p in PACKAGE.rglob("*.py")} - {PACKAGE / "__init__.py"}
    assert every <= set(ALL)  # and none outside a layer


def test_the_peft_view_imports_nothing_of_livar_but_its_errors():
    livar = tuple(f"livar_merge.{m}" for m in ("aggregation", "federated", "engines", "flower"))
    assert offenders(PEFT_VIEW, (*livar, "livar_merge.apps", "livar_merge.lora")) == []


def test_the_core_and_the_methods_import_no_runtime_engine_or_app():
    forbidden = (*M_RUNTIME, *M_ENGINES, *M_APPS, "flwr", "ray")
    assert offenders([*CORE, *METHODS], forbidden) == []
    assert offenders(CORE, M_METHODS) == []  # the methods build on the core, not back


def test_the_trackers_import_only_the_core():
    forbidden = (*M_PEFT_VIEW, *M_METHODS, *M_RUNTIME, *M_ENGINES, *M_APPS, "flwr", "ray", "torch")
    assert (
        offenders(TRACKING, forbidden, allow={"livar_merge/tracking/sinks/tensorboard_sink.py"})
        == []
    )
    assert offenders([*CORE, *METHODS, *PEFT_VIEW], M_TRACKING) == []


def test_the_runtime_imports_no_engine_or_app():
    assert offenders(RUNTIME, (*M_ENGINES, *M_APPS, "flwr", "ray")) == []


def test_the_engines_import_no_app():
    assert offenders([*ENGINES, *FLOWER], M_APPS) == []
    assert offenders(ENGINES, ("livar_merge.flower", "flwr")) == []  # Flower is its own engine


def test_flwr_and_ray_have_one_home_each():
    assert offenders([p for p in ALL if p not in FLOWER], ("flwr",)) == []
    assert offenders(ALL, ("ray",), allow={"livar_merge/engines/ray_engine.py"}) == []


def test_the_apps_stay_apart():
    assert offenders(CALIB, ("analysis",)) == []
    assert offenders([*APPS, *CALIB], ("analysis",)) == []


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
