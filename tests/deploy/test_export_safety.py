"""bitlaw-export never destroys: --force replaces only an earlier export's own files, never a user's directory, the
run it exports from or a file; nothing is deleted before the new export is complete; modes follow the umask; a
missing tokenizer is an error at export time; a run directory is a source."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bitlaw.deploy import native, staging
from bitlaw.deploy.export import main
from bitlaw.deploy.generate import main as generate_main
from bitlaw.deploy.load import load_model
from tests.deploy.checkpoints import small_checkpoint, small_run, small_tokenizer


def _export(source: Path, out: Path, *flags: str, kind: str = "native") -> int:
    return main([str(source), "--format", kind, "--out", str(out), *flags])


def _hidden(directory: Path) -> list[str]:
    """Entries a staging or swap step could leave behind (bitlaw's names start with a dot)."""
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return small_run(tmp_path / "run")


def test_force_refuses_a_user_directory_and_its_file_survives(run: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert _export(run, mine, "--force") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"bitlaw-export: --out {mine} is not empty and is not a bitlaw export (no bitlaw.json)" in err
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("inside", ["", "checkpoints"])
def test_force_refuses_the_run_directory_and_the_checkpoint_survives(run: Path, inside: str, capsys) -> None:
    checkpoint = run / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    for source in (run, checkpoint):
        assert _export(source, run / inside, "--force") == 2
        assert f"contains the checkpoint being exported ({checkpoint})" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before and (run / "run.json").is_file()
    assert _hidden(run) == [] and _hidden(run / "checkpoints") == []


def test_an_out_path_that_is_a_file_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"keep me")
    for flags in ((), ("--force",)):
        assert _export(run, target, *flags) == 2
        assert f"--out {target} is a file, not a directory" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"
    assert _export(run, target / "sub", "--force") == 2
    assert f"{target} is a file, not a directory" in capsys.readouterr().err


def test_force_replaces_an_earlier_export_keeps_added_files_and_leaves_nothing_behind(run: Path,
                                                                                    tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "exports" / "model"
    assert _export(run, out, kind="hf") == 0
    assert sorted(os.listdir(out)) == ["bitlaw.json", "config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    (out / "README.md").write_text("my model card")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert _export(run, out, "--force") == 0  # hf → native: config.json and tokenizer_config.json are the old's own
    assert sorted(os.listdir(out)) == [".git", "README.md", "bitlaw.json", "model.safetensors", "tokenizer.json"]
    assert (out / "README.md").read_text() == "my model card" and (out / ".git" / "HEAD").is_file()
    assert json.loads((out / "bitlaw.json").read_text())["format"] == "bitlaw-native"
    assert load_model(out).verified
    assert _hidden(out.parent) == []
    assert _export(run, out, "--force", kind="hf") == 0
    assert load_model(out).kind == "hf" and (out / "README.md").is_file() and _hidden(out.parent) == []


def test_force_replaces_a_native_export_of_format_version_1(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    assert _export(run, out) == 0
    meta = json.loads((out / "bitlaw.json").read_text())
    files = meta.pop("files")  # version 1 listed the tensor file's sha256 only, and named the tokenizer
    meta.update(version=1, sha256={"model.safetensors": files["model.safetensors"]["sha256"]})
    (out / "bitlaw.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 1 is not supported.*export it again from its checkpoint"):
        load_model(out)
    assert _export(run, out, "--force") == 0
    assert sorted(os.listdir(out)) == ["bitlaw.json", "model.safetensors", "tokenizer.json"]
    assert load_model(out).verified and _hidden(tmp_path) == []


def test_force_onto_an_empty_directory_works(run: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert _export(run, tmp_path / "empty", "--force") == 0
    assert load_model(tmp_path / "empty").kind == "native"


def test_a_user_file_named_like_an_export_file_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "e"
    assert _export(run, out, "--no-tokenizer") == 0  # native: no config.json
    (out / "config.json").write_text('{"mine": true}')
    assert _export(run, out, "--force", kind="hf") == 2
    assert "holds ['config.json'], which its bitlaw.json does not list" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"mine": true}' and load_model(out).kind == "native"


def test_a_failed_export_leaves_the_earlier_one_untouched(run: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "e"
    assert _export(run, out) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def fail(tensors, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(native, "save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        _export(run, out, "--force")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert _hidden(tmp_path) == []


def test_force_refuses_a_manifest_naming_files_outside_its_directory(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "e"
    assert _export(run, out) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    meta = json.loads((out / "bitlaw.json").read_text())
    meta["files"]["../victim.txt"] = {"bytes": 8, "sha256": ""}
    (out / "bitlaw.json").write_text(json.dumps(meta))
    assert _export(run, out, "--force") == 2
    assert "lists the file name '../victim.txt', which is not a plain file name" in capsys.readouterr().err
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
@pytest.mark.parametrize("kind", ["native", "hf"])
def test_modes_follow_the_umask(run: Path, tmp_path: Path, umask: int, dir_mode: int, file_mode: int,
                                kind: str) -> None:
    if kind == "hf":
        pytest.importorskip("transformers")
    previous = os.umask(umask)
    try:
        for flags in ((), ("--force",)):  # a new export, then one swapped in over it
            assert _export(run, tmp_path / "e", *flags, kind=kind) == 0
            assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == dir_mode
            modes = {name: stat.S_IMODE((tmp_path / "e" / name).stat().st_mode) for name in os.listdir(tmp_path / "e")}
            assert set(modes.values()) == {file_mode}, modes
    finally:
        os.umask(previous)


def test_an_unwritable_output_location_is_one_line(run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root writes anywhere, so the read-only directory is simulated where the check asks.
    monkeypatch.setattr(staging.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    assert _export(run, locked / "e") == 2
    err = capsys.readouterr().err
    assert err == f"bitlaw-export: --out {locked / 'e'}: cannot write in {locked} (read-only or permission denied); " \
                  "choose another --out (nothing was written)\n"
    assert os.listdir(locked) == []


def test_a_read_only_directory_is_refused(run: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    command = [sys.executable, "-m", "bitlaw.deploy.export", str(run), "--format", "native", "--out",
               str(locked / "e")]
    if os.geteuid() == 0:
        # Root writes into any directory, whatever its mode. In a user namespace that maps root to an unprivileged
        # id, the same files are the process's own but it holds no capability, so the mode binds as it does for a
        # user (CI runs as root).
        command = ["unshare", "--user", "--map-user=65534", "--map-group=65534", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == f"bitlaw-export: --out {locked / 'e'}: cannot write in {locked} (read-only or permission " \
                          "denied); choose another --out (nothing was written)\n"
    assert os.listdir(locked) == []


def test_a_missing_tokenizer_is_an_error_at_export_time(tmp_path: Path, capsys) -> None:
    gone = tmp_path / "data_cache" / "moved" / "tokenizer.json"
    ckpt = small_checkpoint(tmp_path, "quest_w4a4", tokenizer=gone)
    assert _export(ckpt, tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert f"tokenizer '{gone}' recorded in checkpoint {ckpt} does not exist" in err and "--no-tokenizer" in err
    assert not (tmp_path / "e").exists() and _hidden(tmp_path) == []

    assert _export(ckpt, tmp_path / "e", "--no-tokenizer") == 0
    assert "note: exported without a tokenizer" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "bitlaw.json").read_text())["tokenizer"] is None
    assert not (tmp_path / "e" / "tokenizer.json").exists()
    assert generate_main([str(tmp_path / "e"), "--prompt", "the"]) == 2
    assert f"{tmp_path / 'e'} has no tokenizer (the export has none): pass --tokenizer" in capsys.readouterr().err

    tokenizer = small_tokenizer(tmp_path / "elsewhere.json")
    assert _export(ckpt, tmp_path / "e", "--force", "--tokenizer", str(tokenizer)) == 0
    assert (tmp_path / "e" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert load_model(tmp_path / "e").tokenizer_path == tmp_path / "e" / "tokenizer.json"

    none = small_checkpoint(tmp_path, "bf16")
    assert _export(none, tmp_path / "f") == 2
    assert f"checkpoint {none} records no tokenizer: pass --tokenizer" in capsys.readouterr().err
    assert _export(none, tmp_path / "f", "--tokenizer", str(tmp_path / "absent.json")) == 2
    assert "--tokenizer '" in capsys.readouterr().err and not (tmp_path / "f").exists()


def test_a_run_directory_is_a_source(run: Path, tmp_path: Path, capsys) -> None:
    assert _export(run, tmp_path / "e") == 0
    assert f"using {run / 'checkpoints' / 'last.ckpt'}, the last checkpoint of run directory {run}" in (
        capsys.readouterr().err)
    assert load_model(run).source == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "last.ckpt").unlink()
    assert _export(run, tmp_path / "f") == 2
    assert f"run directory '{run}' has no checkpoints/last.ckpt" in capsys.readouterr().err
