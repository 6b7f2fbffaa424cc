"""The dependency direction of the packages: train → models → kernels, scaling → kernels; deploy and compress use
models, kernels and data, never train; kernels depends on no other part of bitlaw."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "kernels": set(),
    "data": {"kernels"},  # the location of conf/ (kernels.recipe.CONF_DIR), nothing else
    "models": {"kernels"},
    "scaling": {"kernels"},
    "train": {"kernels", "models", "data"},
    "deploy": {"kernels", "models", "data"},
    "compress": {"kernels", "models", "data", "deploy"},
}


def bitlaw_imports(path: Path) -> set[str]:
    """The bitlaw packages (``kernels``, ``train`` …) a module imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("bitlaw.") and name.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", sorted(p for p in ALLOWED if (ROOT / p).is_dir()))
def test_imports_follow_the_layering(package):
    folder = ROOT / package
    wrong = {str(path.relative_to(ROOT)): sorted(bitlaw_imports(path) - ALLOWED[package] - {package})
             for path in folder.rglob("*.py")}
    assert not {k: v for k, v in wrong.items() if v}, f"{package} may import only {sorted(ALLOWED[package])}"


def test_every_code_package_has_a_layer():
    code = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.py"))}
    assert code - {"tests"} <= set(ALLOWED)
