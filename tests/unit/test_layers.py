"""The README's library layout, enforced: each layer imports only the layers below it, and the
round engine and the server import no TensorFlow (read from the source, nothing is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "pyfed"

#: layer -> the layers (pyfed sub-packages, or "ranges") its modules may import; entry points may import all
MAY_IMPORT = {
    "ranges": set(),
    "wire": {"wire", "ranges"},
    "persistence": {"persistence", "wire", "ranges"},
    "learning": {"learning", "persistence", "wire", "ranges"},
    "federation": {"federation", "persistence", "wire", "ranges"},
}
#: federation modules that run local training, and so may use the learning layer
FEDERATION_WITH_LEARNING = {"client.py", "simulation.py"}
ML_FRAMEWORKS = {"tensorflow", "keras"}


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if relative.parts[0] == "ranges.py":
        return "ranges"
    return relative.parts[0] if len(relative.parts) > 1 else "entry points"


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (at any depth: lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def pyfed_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pyfed" or len(parts) == 1:
        return None if parts[0] != "pyfed" else "entry points"
    return "ranges" if parts[1] == "ranges" else (parts[1] if parts[1] in MAY_IMPORT else "entry points")


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p) != "entry points")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_its_own_layer_and_those_below(path):
    layer = layer_of(path)
    allowed = set(MAY_IMPORT[layer])
    if layer == "federation" and path.name in FEDERATION_WITH_LEARNING:
        allowed.add("learning")
    wrong = {module for module in imported_modules(path)
             if (target := pyfed_layer(module)) is not None and target not in allowed}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}; it may import {sorted(allowed)}"


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(p) in ("wire", "persistence", "ranges", "federation")
                                  and p.name not in FEDERATION_WITH_LEARNING],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_engine_server_wire_and_persistence_import_no_ml_framework(path):
    name = str(path.relative_to(PACKAGE))
    frameworks = {m for m in imported_modules(path) if m.split(".")[0] in ML_FRAMEWORKS}
    assert not frameworks, f"{name} imports {sorted(frameworks)}"


def test_the_layer_table_lists_every_layer():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## Library layout"):readme.index("## Operations")]
    for layer in ("wire", "persistence", "learning", "federation"):
        assert f"`pyfed/{layer}/" in table, layer
    assert "`pyfed/ranges.py`" in table
    assert {p.parent.name for p in PACKAGE.rglob("*.py")} - {"pyfed", "strategy"} == set(MAY_IMPORT) - {"ranges"}
