"""bitlaw installs as one package, ``bitlaw``: a non-editable install into a fresh virtual environment works from
any directory next to Hugging Face's ``kernels`` package, and no folder of the repository is left out of it."""

from __future__ import annotations

import importlib.metadata
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
    assert "bitlaw.conf" in listed and setuptools["package-data"]["bitlaw.conf"] == ["**/*.yaml"]


def test_no_top_level_name_of_bitlaw_is_importable_from_the_repository_root():
    probe = ("import importlib.util, sys\n"
             "for name in ('kernels', 'models', 'train', 'data', 'deploy', 'scaling', 'conf'):\n"
             "    spec = importlib.util.find_spec(name)\n"
             "    if spec is not None and spec.origin and spec.origin.startswith(sys.argv[1]):\n"
             "        print(name, spec.origin)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out == "", f"importable as top-level modules from the repository root: {out}"


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
    check = ("import sys, kernels\n"
             "assert not [m for m in sys.modules if m.startswith('bitlaw')], 'import kernels imported bitlaw'\n"
             "import bitlaw.kernels.formats, bitlaw.train.cli, bitlaw.deploy.load, bitlaw.scaling.fit\n"
             "print(kernels.__file__); print(bitlaw.kernels.formats.__file__)\n")
    for cwd in (tmp_path, ROOT):  # also from the repository root, where the folders kernels/, train/ … lie
        done = _run(fresh_venv, [python, "-c", check], cwd)
        assert done.returncode == 0, done.stderr[-2000:]
        hf_kernels, formats = done.stdout.split()
        assert "bitlaw" not in hf_kernels and Path(hf_kernels).parent.name == "kernels"
        assert formats.startswith(str(fresh_venv)) and formats.endswith("bitlaw/kernels/formats.py")

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
