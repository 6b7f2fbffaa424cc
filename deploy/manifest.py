"""The manifest of every bitlaw export: ``bitlaw.json``, listing each file of the export with its size and sha256.

Every export kind carries one: a native export (format ``bitlaw-native``), a Hugging Face export (format
``bitlaw-hf``) and a compressed-tensors export (format ``bitlaw-compressed-tensors``). It is what marks a directory as
bitlaw's own export, so that ``--force`` may replace exactly the files it lists and nothing else, and what the
loaders check every file against before reading any tensor.

Common fields: ``format``, ``version``, ``model`` (LlamaConfig fields), ``recipe`` (the training recipe),
``tokenizer`` (the tokenizer file name, or null when the export has none), ``data`` (the prepared data set the
model was trained on: ``{"directory", "config_hash"}``, or null when unknown, so evaluation finds its validation
split) and ``files`` (``{name: {"bytes": int, "sha256": hex}}`` for every file of the export but the manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.shards import sha256_file

MANIFEST_FILE = "bitlaw.json"
NATIVE_FORMAT = "bitlaw-native"
HF_FORMAT = "bitlaw-hf"
CT_FORMAT = "bitlaw-compressed-tensors"
FORMATS = {NATIVE_FORMAT: 2, HF_FORMAT: 1, CT_FORMAT: 1}
"""The format versions this code writes and reads."""
_NATIVE_V1 = 1  # listed its tensor file only (``sha256``); still recognised so that --force can replace it


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of every file in ``directory`` (flat), the manifest excepted."""
    return {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(directory.iterdir()) if path.is_file() and path.name != MANIFEST_FILE}


def _plain_name(name: object, manifest: Path) -> str:
    """``name`` when it names a file directly inside the export directory; ValueError otherwise (a manifest
    must never lead the loader or --force outside its own directory)."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{manifest} lists the file name {name!r}, which is not a plain file name inside "
                         f"{manifest.parent}: not a manifest written by bitlaw-export")
    return name


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of ``directory``; FileNotFoundError when there is none, ValueError when it is not
    valid JSON or not an object."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a bitlaw export: {MANIFEST_FILE} is missing")
    return read_json_object(path, "the export is damaged; export it again")


def read_json_object(path: Path, remedy: str) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file, what is wrong and ``remedy`` when it is not valid
    JSON (truncated, edited) or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): {remedy}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object: {remedy}")
    return value


def own_files(directory: Path) -> set[str]:
    """The names of the files an earlier bitlaw export in ``directory`` consists of, its manifest included;
    ValueError when its manifest is not one of a format bitlaw writes (or wrote: native version 1)."""
    meta = read_manifest(directory)
    path = directory / MANIFEST_FILE
    fmt, version = meta.get("format"), meta.get("version")
    if fmt == NATIVE_FORMAT and version == _NATIVE_V1:
        listed = list(meta.get("sha256") or {}) + ([meta["tokenizer"]] if meta.get("tokenizer") else [])
    elif FORMATS.get(fmt) == version and isinstance(meta.get("files"), dict):
        listed = list(meta["files"])
    else:
        raise ValueError(f"{path} is not the manifest of a bitlaw export this version knows (format {fmt!r} "
                         f"version {version!r}; known: {FORMATS})")
    return {_plain_name(name, path) for name in listed} | {MANIFEST_FILE}


def verify_export(directory: Path, fmt: str, required: tuple[str, ...]) -> dict[str, Any]:
    """Check a bitlaw export before any of it is read: its manifest has format ``fmt`` at the version this code
    reads, lists every file in ``required`` and the tokenizer it names, and every listed file exists with the
    recorded size and sha256. Returns the manifest; raises FileNotFoundError or ValueError naming the file."""
    meta = read_manifest(directory)
    path = directory / MANIFEST_FILE
    if meta.get("format") != fmt or meta.get("version") != FORMATS[fmt]:
        hint = " (written by an earlier bitlaw: export it again from its checkpoint)" if (
            meta.get("format") == fmt and isinstance(meta.get("version"), int)
            and meta["version"] < FORMATS[fmt]) else ""
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not supported; "
                         f"this loader reads {fmt!r} version {FORMATS[fmt]}{hint}")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{path} has no 'files' object listing the export's files: the export is damaged")
    tokenizer = [meta["tokenizer"]] if meta.get("tokenizer") else []
    for name in (*required, *tokenizer):
        if name not in files:
            raise ValueError(f"{path} does not list {name!r} in 'files': the export is damaged; export it again")
    for name, record in files.items():
        file = directory / _plain_name(name, path)
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing (listed in {MANIFEST_FILE})")
        size = file.stat().st_size
        if size != record.get("bytes"):
            raise ValueError(f"{file} is truncated or modified: {size} bytes, {MANIFEST_FILE} records "
                             f"{record.get('bytes')}")
        digest = sha256_file(file)
        if digest != record.get("sha256"):
            raise ValueError(f"{file} is truncated or modified: sha256 {digest} does not match "
                             f"{record.get('sha256')} recorded in {MANIFEST_FILE}")
    return meta
