"""bitlaw installs as one package, ``bitlaw``: a non-editable install into a fresh virtual environment works from
any directory next to Hugging Face's ``kernels`` package, and no folder of the repository is left out of it."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_source_folder_is_a_listed_package():
    setuptools = _pyproject()["tool"]["setuptools"]
    package_dirs = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    assert all(name.startswith("bitlaw.") for name in listed) and set(package_dirs) <= listed
    for name, folder in package_dirs.items():
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would make '{folder}' importable"
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.parent.relative_to(ROOT / folder)
            package = ".".join([name, *relative.parts])
            assert package in listed, f"{path.relative_to(ROOT)} is in {package}, missing from pyproject's packages"
    # Every top-level folder holding code or configs is part of the package (tests/ and tools/ are not installed).
    code = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (any(p.rglob("*.py")) or any(p.rglob("*.yaml")))}
    assert code - {"tests", "tools"} == set(package_dirs.values())
    assert "bitlaw.conf" in listed and setuptools["package-data"]["bitlaw.conf"] == ["**/*.yaml"]


def package_folders() -> list[str]:
    """Every top-level folder pyproject maps into ``bitlaw`` (``kernels`` for ``bitlaw.kernels``, ``conf``, …)."""
    return sorted(_pyproject()["tool"]["setuptools"]["package-dir"].values())


# Run from ``root`` with ``root`` first on sys.path (as ``python -c`` and ``python -m`` put the working directory), and
# ``extra`` after it: for each name, report a module or regular package inside ``root`` (bitlaw code answering to a
# generic name), or a namespace package that merges a folder of ``root`` with packages of the same name elsewhere
# (the folder's modules would hide the others'). A namespace package made of the folder alone hides nothing: CPython
# makes one of every directory on sys.path (docs/ and tools/ too).
_SHADOW_PROBE = """
import importlib.util, json, os, sys
root, names, extra = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.path[:] = [root, *extra, *sys.path[1:]]
inside = lambda path: os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)
found = {}
for name in names:
    spec = importlib.util.find_spec(name)
    if spec is None:
        continue
    locations = list(spec.submodule_search_locations or [])
    if spec.origin and inside(spec.origin):
        found[name] = "a module or regular package of the repository: " + spec.origin
    elif spec.origin is None and any(map(inside, locations)) and not all(map(inside, locations)):
        found[name] = "a namespace package merging the repository's folder with " + ", ".join(
            path for path in locations if not inside(path))
print(json.dumps(found))
"""


def shadowed_names(root: Path, names: list[str], extra: list[str] = ()) -> dict[str, str]:
    """What :data:`_SHADOW_PROBE` reports for ``names`` imported from ``root`` (name → what shadows it)."""
    done = subprocess.run([sys.executable, "-c", _SHADOW_PROBE, str(root), json.dumps(names), json.dumps(list(extra))],
                          cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_no_folder_shadows_a_package_from_the_repository_root():
    names = package_folders()
    assert {"core", "kernels", "models", "train", "data", "deploy", "scaling", "compress", "benchmarks",
            "conf"} <= set(names)
    assert shadowed_names(ROOT, names) == {}


def test_the_shadow_probe_catches_planted_shadows(tmp_path):
    repository, installed = tmp_path / "repository", tmp_path / "site"
    for folder in ("models", "train", "data"):
        (repository / folder).mkdir(parents=True)
        (repository / folder / "module.py").write_text("")
    (repository / "train" / "__init__.py").write_text("")  # a regular package: bitlaw code under "train"
    (installed / "data").mkdir(parents=True)  # an installed namespace package "data", merged with the folder
    (installed / "data" / "other.py").write_text("")
    found = shadowed_names(repository, ["models", "train", "data"], [str(installed)])
    assert set(found) == {"train", "data"}, found
    assert "regular package" in found["train"] and str(installed / "data") in found["data"]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new virtual environment holding a non-editable install of this checkout (a wheel built from it); the
    dependencies come from this interpreter's site-packages through a path file (its .pth files, among them an
    editable install of bitlaw, are not executed there)."""
    root = tmp_path_factory.mktemp("venv")
    source, wheels = root / "source", root / "wheels"
    # A copy of the checkout's files (tracked or not ignored): the build writes its build/ folder there, not here.
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, text=True, timeout=600)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "outer-dependencies.pth").write_text("\n".join(outer) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", *map(str, wheels.glob("bitlaw-*.whl"))], check=True, capture_output=True,
                   text=True, timeout=600)
    return venv


def _run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)})


def test_installed_bitlaw_and_huggingface_kernels_live_side_by_side(fresh_venv, tmp_path, corpus):
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` package is not installed: pip install -e '.[dev]' installs it")
    python = str(fresh_venv / "bin" / "python")
    check = ("import importlib.metadata, sys, kernels\n"
             "assert not [m for m in sys.modules if m.startswith('bitlaw')], 'import kernels imported bitlaw'\n"
             "import bitlaw.kernels.formats, bitlaw.train.cli, bitlaw.deploy.load, bitlaw.scaling.fit\n"
             "print(kernels.__file__); print(bitlaw.kernels.formats.__file__)\n"
             "print(importlib.metadata.distribution('kernels').locate_file('kernels/__init__.py'))\n")
    for cwd in (tmp_path, ROOT):  # also from the repository root, where the folders kernels/, train/ … lie
        done = _run(fresh_venv, [python, "-c", check], cwd)
        assert done.returncode == 0, done.stderr[-2000:]
        hf_kernels, formats, distributed = done.stdout.split()
        assert Path(hf_kernels).resolve() == Path(distributed).resolve(), "import kernels is not Hugging Face's"
        assert formats.startswith(str(fresh_venv)) and formats.endswith("bitlaw/kernels/formats.py")

    # Nothing of bitlaw is installed under a generic top-level name: every file is in bitlaw/, its dist-info or bin/.
    listed = _run(fresh_venv, [python, "-c", "import importlib.metadata as m; print(*m.files('bitlaw'), sep='\\n')"],
                  tmp_path)
    tops = {Path(name).parts[0] for name in listed.stdout.split()}
    assert "bitlaw" in tops and {top for top in tops if top not in ("bitlaw", "..") and not (
        top.startswith("bitlaw-") and top.endswith(".dist-info"))} == set(), tops
    info = _run(fresh_venv, ["bitlaw-info", "model=30m", "quant=quest_w4a4"], tmp_path)
    assert info.returncode == 0 and "non-embedding parameters N: 30,482,560" in info.stdout, info.stderr[-2000:]
    run_dir = tmp_path / "run"
    trained = _run(fresh_venv, ["bitlaw-train", "data=files", f"data.paths=[{corpus}]", "data.bpe_vocab_size=300",
                                "model.n_layer=1", "model.d_model=128", "model.n_head=1", "seq_len=32",
                                "global_batch=4", "tokens=null", "trainer.max_steps=2", "quant=quest_w4a4",
                                "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run_dir / "run.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    fit = _run(fresh_venv, ["bitlaw-fit", "predict", "--help"], tmp_path)
    assert fit.returncode == 0 and "--memory-bytes" in fit.stdout
