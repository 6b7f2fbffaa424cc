"""Reading, writing and verifying the manifest of every bitlaw export, ``bitlaw.json``
(:class:`~bitlaw.core.records.ExportManifest`: the model, recipe, tokenizer, data set and training run of the export,
and each of its files with its size and sha256).

Every export kind carries one: a native export (format ``bitlaw-native``), a Hugging Face export (``bitlaw-hf``) and a
compressed-tensors export (``bitlaw-compressed-tensors``). It is what marks a directory as bitlaw's own export, so
that ``--force`` may replace exactly the files it lists and nothing else, and what the loaders check every file
against before reading any tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.records import (
    CT_FORMAT,
    EXPORT_FORMATS,
    HF_FORMAT,
    MANIFEST_FILE,
    NATIVE_FORMAT,
    NATIVE_V1,
    ExportManifest,
    FileEntry,
    read_json_object,
)
from ..data.shards import sha256_file

__all__ = ["CT_FORMAT", "HF_FORMAT", "MANIFEST_FILE", "NATIVE_FORMAT", "export_format", "file_entries", "own_files",
           "read_manifest", "verify_export", "write_manifest"]


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """The size and sha256 of every file in ``directory`` (flat), the manifest excepted."""
    return {path.name: FileEntry(path.stat().st_size, sha256_file(path))
            for path in sorted(directory.iterdir()) if path.is_file() and path.name != MANIFEST_FILE}


def write_manifest(directory: Path, manifest: ExportManifest) -> None:
    """Write ``manifest`` as ``directory/bitlaw.json``, its ``files`` replaced by every file now in ``directory``
    (call it last, when the export's other files are complete)."""
    listed = ExportManifest(**{**manifest.__dict__, "files": file_entries(directory)})
    (directory / MANIFEST_FILE).write_text(listed.to_json(), encoding="utf-8")


def _plain_name(name: object, manifest: Path) -> str:
    """``name`` when it names a file directly inside the export directory; ValueError otherwise (a manifest
    must never lead the loader or --force outside its own directory)."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{manifest} lists the file name {name!r}, which is not a plain file name inside "
                         f"{manifest.parent}: not a manifest written by bitlaw-export")
    return name


def _manifest_data(directory: Path) -> dict[str, Any]:
    """The parsed ``bitlaw.json`` of ``directory``, unchecked; FileNotFoundError when there is none, ValueError when
    it is not a JSON object."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a bitlaw export: {MANIFEST_FILE} is missing")
    return read_json_object(path, "the export is damaged; export it again")


def export_format(directory: Path) -> str | None:
    """The ``format`` field of ``directory``'s manifest (which loader reads it), whatever its version; None when it
    names none."""
    fmt = _manifest_data(directory).get("format")
    return fmt if isinstance(fmt, str) else None


def read_manifest(directory: Path) -> ExportManifest:
    """The manifest of ``directory``, of a format and version this code reads (files not verified: see
    :func:`verify_export`); FileNotFoundError when there is none, ValueError naming what is wrong."""
    return ExportManifest.from_dict(_manifest_data(directory), str(directory / MANIFEST_FILE))


def own_files(directory: Path) -> set[str]:
    """The names of the files an earlier bitlaw export in ``directory`` consists of, its manifest included;
    ValueError when its manifest is not one of a format bitlaw writes (or wrote: native version 1)."""
    meta = _manifest_data(directory)
    path = directory / MANIFEST_FILE
    if meta.get("format") == NATIVE_FORMAT and meta.get("version") == NATIVE_V1:
        listed = list(meta.get("sha256") or {}) + ([meta["tokenizer"]] if meta.get("tokenizer") else [])
    elif EXPORT_FORMATS.get(meta.get("format")) == meta.get("version") and isinstance(meta.get("files"), dict):
        listed = list(meta["files"])
    else:
        raise ValueError(f"{path} is not the manifest of a bitlaw export this version knows (format "
                         f"{meta.get('format')!r} version {meta.get('version')!r}; known: {EXPORT_FORMATS})")
    return {_plain_name(name, path) for name in listed} | {MANIFEST_FILE}


def verify_export(directory: Path, fmt: str, required: tuple[str, ...]) -> ExportManifest:
    """Check a bitlaw export before any of it is read: its manifest has format ``fmt`` at the version this code
    reads, lists every file in ``required`` and the tokenizer it names, and every listed file exists with the
    recorded size and sha256. Returns the manifest; raises FileNotFoundError or ValueError naming the file."""
    path = directory / MANIFEST_FILE
    meta = _manifest_data(directory)
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {fmt!r}, the format this loader reads")
    manifest = ExportManifest.from_dict(meta, str(path))
    tokenizer = [manifest.tokenizer] if manifest.tokenizer else []
    for name in (*required, *tokenizer):
        if name not in manifest.files:
            raise ValueError(f"{path} does not list {name!r} in 'files': the export is damaged; export it again")
    for name, entry in manifest.files.items():
        file = directory / _plain_name(name, path)
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing (listed in {MANIFEST_FILE})")
        size = file.stat().st_size
        if size != entry.bytes:
            raise ValueError(f"{file} is truncated or modified: {size} bytes, {MANIFEST_FILE} records {entry.bytes}")
        digest = sha256_file(file)
        if digest != entry.sha256:
            raise ValueError(f"{file} is truncated or modified: sha256 {digest} does not match {entry.sha256} "
                             f"recorded in {MANIFEST_FILE}")
    return manifest
