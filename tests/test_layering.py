"""The dependency direction of bitlaw's packages, read from the source with ``ast`` (relative imports resolved).

``core`` is the bottom layer (the config root, the typed records); ``kernels`` and ``data`` sit on it; ``models``
on kernels; ``train``, ``deploy`` and ``compress`` on models (compress also on deploy); ``scaling`` on kernels;
``benchmarks`` on top of everything, imported by nothing. Inside the package every import of bitlaw is relative.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = {
    "core": set(),
    "kernels": {"core"},
    "data": {"core"},
    "models": {"core", "kernels"},
    "scaling": {"core", "kernels"},
    "train": {"core", "kernels", "models", "data"},
    "deploy": {"core", "kernels", "models", "data"},
    "compress": {"core", "kernels", "models", "data", "deploy"},
}
ALLOWED = {**RUNTIME, "benchmarks": set(RUNTIME)}  # benchmarks, profiles and studies: on top, never imported


def package_folders() -> dict[str, str]:
    """``{folder: package}`` for every top-level folder pyproject maps into bitlaw (``kernels``: ``bitlaw.kernels``)."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {folder: package for package, folder in mapping.items()}


def module_package(path: Path) -> list[str]:
    """The package of the module at ``path`` as a list (``kernels/triton/quant.py``: bitlaw, kernels, triton)."""
    relative = path.relative_to(ROOT)
    return package_folders()[relative.parts[0]].split(".") + list(relative.parts[1:-1])


def imported_modules(path: Path, package: list[str] | None = None) -> list[tuple[str, int, bool]]:
    """Every module ``path`` imports, at any depth of the file, as ``(absolute dotted name, line, written
    absolutely)``; relative imports are resolved against ``package`` (default: the module's own package)."""
    package = module_package(path) if package is None else package
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.module, node.lineno, True))
                continue
            base = package[:len(package) - node.level + 1]
            if node.module:
                found.append((".".join([*base, node.module]), node.lineno, False))
            else:  # from . import a, b: each name is a module of the package (or a name defined in it)
                found += [(".".join([*base, alias.name]), node.lineno, False) for alias in node.names]
    return found


def bitlaw_layers(path: Path) -> set[str]:
    """The bitlaw packages (``kernels``, ``train`` …) the module at ``path`` imports."""
    return {name.split(".")[1] for name, _, _ in imported_modules(path)
            if name.startswith("bitlaw.") and name.count(".") >= 1}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layering(package):
    folder = ROOT / package
    assert folder.is_dir() and package in package_folders(), f"{package}/ is not a folder mapped into bitlaw"
    wrong = {str(path.relative_to(ROOT)): sorted(bitlaw_layers(path) - ALLOWED[package] - {package})
             for path in folder.rglob("*.py")}
    assert not {k: v for k, v in wrong.items() if v}, f"{package} may import only {sorted(ALLOWED[package])}"


def test_every_package_folder_has_a_layer():
    assert set(package_folders()) - {"conf"} == set(ALLOWED)


def test_no_module_imports_its_own_package_absolutely():
    absolute = [f"{path.relative_to(ROOT)}:{line}: {name}" for folder in package_folders()
                for path in sorted((ROOT / folder).rglob("*.py"))
                for name, line, written_absolutely in imported_modules(path)
                if written_absolutely and (name == "bitlaw" or name.startswith("bitlaw."))]
    assert not absolute, "inside the package, import bitlaw's modules relatively (from ..kernels.recipe import …)"


def test_the_import_reader_resolves_relative_imports_and_flags_absolute_ones(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from . import stages\nfrom ..kernels.recipe import Recipe\n"
                       "def later():\n    from bitlaw.train import cli\n    import bitlaw.models.llama\n")
    assert imported_modules(planted, ["bitlaw", "compress"]) == [
        ("bitlaw.compress.stages", 1, False), ("bitlaw.kernels.recipe", 2, False), ("bitlaw.train", 4, True),
        ("bitlaw.models.llama", 5, True)]


def module_file(name: str) -> Path | None:
    """The file or folder of the bitlaw module ``name`` (``bitlaw.kernels.recipe`` → kernels/recipe.py) in the
    checkout, found from pyproject's folder mapping alone, as a static tool resolves it; None when there is none."""
    parts = name.split(".")
    for folder, package in package_folders().items():
        prefix = package.split(".")
        if parts[:len(prefix)] == prefix:
            path = ROOT.joinpath(folder, *parts[len(prefix):])
            for candidate in (path.with_suffix(".py"), path):
                if candidate.exists():
                    return candidate
    return None


def test_every_relative_import_resolves_to_a_module_of_the_checkout():
    unresolved = []
    for folder in package_folders():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, line, absolute in imported_modules(path):
                if absolute or module_file(name) is not None:
                    continue
                # ``from . import name`` may import a name the package defines rather than a module.
                parent = module_file(name.rsplit(".", 1)[0])
                defined = parent is not None and parent.is_file() and name.rsplit(".", 1)[1] in {
                    node.name for node in ast.walk(ast.parse(parent.read_text()))
                    if isinstance(node, ast.FunctionDef | ast.ClassDef)}
                if not defined:
                    unresolved.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not unresolved, unresolved
