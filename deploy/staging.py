"""Writing an export directory without ever destroying anything that is not an earlier export's own file.

:func:`check_out` decides, before anything is written, whether ``out`` may be written: a new path is fine; an
existing one only with ``force`` and only when it is empty or holds an earlier bitlaw export (recognised by its
manifest, :mod:`bitlaw.deploy.manifest`); never a file, a symbolic link, or a directory containing the source
checkpoint. :func:`staged` then writes the new export into a hidden sibling directory and, once it is complete
and on disk, swaps it in: the old directory is renamed aside, the new one renamed into place, files the user
added to the old export directory (a README, a ``.git``) are moved into the new one, and only then are the files
the old manifest lists deleted. Directories and files get the modes the user's umask gives new ones (0777 / 0666
masked), not the private modes of temporary files.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .manifest import MANIFEST_FILE, own_files

EXPORT_NAMES = frozenset({MANIFEST_FILE, "model.safetensors", "config.json", "tokenizer.json",
                          "tokenizer_config.json"})
"""Every file name either export kind writes: a user's file of such a name would be overwritten, so it is refused."""


def _contains(directory: Path, path: Path) -> bool:
    directory, path = directory.resolve(), path.resolve()
    return directory == path or directory in path.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(directory: Path, out: Path) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot write in {directory} (read-only or permission denied); "
                              "choose another --out (nothing was written)")


def check_out(out: Path, force: bool, source: Path | None = None) -> set[str] | None:
    """Decide whether an export may be written to ``out``, before anything is written.

    Returns None when ``out`` does not exist, else the names of the files it holds that the new export replaces
    (empty for an empty directory). Raises, naming ``out``: ValueError when it is a file, a symbolic link, a
    directory containing ``source`` (the checkpoint being exported), or — with ``force`` — a non-empty directory
    that is not an earlier bitlaw export or whose extra files carry a name the export writes; FileExistsError when
    it exists and ``force`` is not set; PermissionError when its directory cannot be written.
    """
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link: give the directory itself (nothing was written)")
    if source is not None and _contains(out, source):
        raise ValueError(f"--out {out} contains the checkpoint being exported ({source}): an export never goes into "
                         "or replaces the run it comes from; choose another --out (nothing was written)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory: an export is a directory; choose another --out "
                         "(nothing was written)")
    ancestor = _nearest_existing(out.parent)
    if not ancestor.is_dir():
        raise ValueError(f"--out {out}: {ancestor} is a file, not a directory (nothing was written)")
    _check_writable(ancestor, out)
    if not out.exists():
        return None
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it (nothing was written)")
    _check_writable(out, out)  # renaming a directory aside updates its '..' entry
    entries = set(os.listdir(out))
    if not entries:
        return set()
    if not (out / MANIFEST_FILE).is_file():
        raise ValueError(f"--out {out} is not empty and is not a bitlaw export (no {MANIFEST_FILE}): --force replaces "
                         "only an earlier export's own files; choose another --out (nothing was written)")
    own = {name for name in own_files(out) if (out / name).is_file() and not (out / name).is_symlink()}
    clash = sorted((entries - own) & EXPORT_NAMES)
    if clash:
        raise ValueError(f"--out {out} holds {clash}, which its {MANIFEST_FILE} does not list: the new export would "
                         "overwrite them; move them away or choose another --out (nothing was written)")
    return own


def _sibling(out: Path, what: str) -> Path:
    return out.with_name(f".{out.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; it is put back at once
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(staging: Path, out: Path, old: set[str] | None) -> None:
    """Put the finished ``staging`` directory at ``out``; with an earlier export there (``old``: its own files),
    keep the user's other files and delete only the ``old`` ones, after the new export is in place."""
    parent = out.parent
    if old is None:
        os.rename(staging, out)
        _fsync(parent)
        return
    extras = set(os.listdir(out)) - old
    clash = sorted(extras & set(os.listdir(staging)))
    if clash:  # files appeared in out while the export was written
        raise ValueError(f"--out {out} now holds {clash}, which the new export would overwrite: nothing was replaced")
    retired = _sibling(out, "replaced")
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired, out)
        raise
    _fsync(parent)
    for name in sorted(extras):
        try:
            os.rename(retired / name, out / name)
        except OSError as err:
            raise OSError(f"{out} holds the new export, but moving your {name} back into it from {retired} failed "
                          f"({err.strerror}): it is still there, with the earlier export's files") from err
    for name in old:
        (retired / name).unlink(missing_ok=True)
    retired.rmdir()


@contextmanager
def staged(out: Path, force: bool, source: Path | None = None) -> Iterator[Path]:
    """A new, empty staging directory beside ``out`` to write the export into; when the block ends without an
    error, the staging directory replaces ``out`` (see the module docstring), else it is removed and ``out`` is
    left as it was. Raises what :func:`check_out` raises before anything is created."""
    old = check_out(out, force, source)
    out = Path(os.path.abspath(out))  # "." or "x/.." have no name to build the sibling names from
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out, "staging")
    staging.mkdir()  # mkdir honours the umask (tempfile.mkdtemp would make it 0700)
    try:
        yield staging
        file_mode = 0o666 & ~_umask()
        for path in staging.iterdir():
            path.chmod(file_mode)  # safetensors writes its file 0600 whatever the umask says
            _fsync(path)
        _fsync(staging)
        _swap(staging, out, old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only our own unfinished directory; gone once swapped in
        raise
