"""Where documents come from: the embedded default corpus (built offline), local files, hub streams.

The embedded corpus is the text of the interactive-help topics (`pydoc_data.topics.topics`), followed by
the prose of the standard-library sources: module, class and function docstrings (read with `ast`, the modules
are never imported) and blocks of consecutive full-line comments. No network, no download, no file written.
The text differs across Python versions, so callers record `sys.version` next to the corpus sha256.

Local files (`.txt`: one document per file; `.jsonl` / `.parquet`: one document per row) are read here, one
file at a time, so that a bad file is reported with its name and line (or row). Hub data sets are streamed
through `datasets.load_dataset(..., streaming=True)`, so nothing is copied into a cache; `datasets` is imported
only when a hub data set is read (it is slow to import).
"""

from __future__ import annotations

import ast
import gc
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Folders of the standard library whose text is not library documentation (tests, the IDLE application, the
# retired 2to3 tool) or not part of CPython at all (site-packages); pydoc_data is read through its dict.
SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages",
                             "dist-packages", "pydoc_data", "__pycache__"})
MIN_DOCSTRING_CHARS = 200
"""Docstrings shorter than this are mostly one-line summaries ("Return x."), too short to be documents."""
MIN_COMMENT_CHARS = 120
"""Comment blocks shorter than this are mostly markers or commented-out code, not prose."""

_DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Statement fields that hold nested statements: definitions can sit inside `if`, `try`, `with`, loops.
_BODY_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


@dataclass(frozen=True)
class EmbeddedCorpus:
    """The embedded corpus: documents in a fixed order and what identifies them.

    documents: one str per help topic / docstring / comment block, in a deterministic order.
    description: one line saying what the documents are and how many of each kind.
    sha256: hex digest of `documents_sha256(documents)`.
    python_version: `sys.version` of the interpreter whose installation the text came from.
    """

    documents: list[str]
    description: str
    sha256: str
    python_version: str

    @property
    def n_bytes(self) -> int:
        """Size of all documents in UTF-8 bytes."""
        return sum(len(document.encode("utf-8")) for document in self.documents)


def documents_sha256(documents: Iterable[str]) -> str:
    """Hex sha256 over the UTF-8 text of `documents`, each followed by a NUL byte (so boundaries count)."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def stdlib_source_files(stdlib_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The standard library's `*.py` files outside SKIPPED_FOLDERS, sorted by path relative to `stdlib_dir`.

    stdlib_dir: defaults to `sysconfig.get_paths()["stdlib"]` of the running interpreter.
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library folder {str(root)!r} does not exist")
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_FOLDERS]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    # Sorting by the relative POSIX path makes the order independent of where Python is installed.
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the module and of every class and function in it, in source order (pre-order)."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, _DEFINITIONS):
            docstring = ast.get_docstring(node, clean=True)
            if docstring:
                yield docstring
        children: list[ast.AST] = []
        for name in _BODY_FIELDS:
            value = getattr(node, name, None)
            if isinstance(value, list):
                children.extend(child for child in value if isinstance(child, ast.AST))
        # Reversed so that popping from the end visits children in source order.
        pending.extend(reversed(children))


def _comment_blocks(source: str) -> Iterator[str]:
    """Runs of consecutive full-line `#` comments, markers stripped, lines joined with newlines.

    A line-based scan rather than `tokenize` keeps the corpus fast to build; a `#` line inside a multi-line
    string is rare in the standard library and is prose anyway.
    """
    block: list[str] = []
    for line in source.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            block.append(stripped.lstrip("#").strip())
            continue
        if block:
            yield "\n".join(block).strip()
            block = []


def _pydoc_topics() -> list[str]:
    """The interactive-help topic texts, sorted by topic name."""
    from pydoc_data.topics import topics  # a plain dict of str; importing it runs no library code

    return [topics[name].strip() for name in sorted(topics)]


def build_embedded_corpus(stdlib_dir: str | os.PathLike[str] | None = None) -> EmbeddedCorpus:
    """Build the embedded corpus from the running Python installation (a few seconds, deterministic).

    Order: help topics sorted by name; then, per standard-library file in `stdlib_source_files` order, its
    docstrings of at least MIN_DOCSTRING_CHARS characters in source order, then its comment blocks of at
    least MIN_COMMENT_CHARS characters. Two calls on the same installation return equal corpora.
    """
    topics = _pydoc_topics()
    docstrings: list[tuple[int, str]] = []
    comments: list[tuple[int, str]] = []
    files = stdlib_source_files(stdlib_dir)
    # The parse trees are dropped right away, so the cyclic collector only costs time here (about 2x).
    collector_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for file_index, path in enumerate(files):
            source = path.read_text(encoding="utf-8")
            try:
                tree = ast.parse(source, filename=str(path))
            except SyntaxError as error:
                raise SyntaxError(f"cannot parse standard-library file {str(path)!r} with Python "
                                  f"{sys.version.split()[0]}: {error}") from error
            docstrings.extend((file_index, text) for text in _docstrings(tree)
                              if len(text) >= MIN_DOCSTRING_CHARS)
            comments.extend((file_index, text) for text in _comment_blocks(source)
                            if len(text) >= MIN_COMMENT_CHARS)
            del tree
    finally:
        if collector_was_enabled:
            gc.enable()
    # Per file: docstrings first, then comments; files in sorted order (a stable sort keeps source order).
    per_file = sorted([(index, 0, text) for index, text in docstrings] +
                      [(index, 1, text) for index, text in comments], key=lambda item: (item[0], item[1]))
    documents = topics + [text for _, _, text in per_file]
    n_chars = sum(len(document) for document in documents)
    description = (f"CPython {sys.version.split()[0]} embedded corpus: {len(topics)} pydoc help topics, "
                   f"{len(docstrings)} docstrings (>= {MIN_DOCSTRING_CHARS} chars) and "
                   f"{len(comments)} comment blocks (>= {MIN_COMMENT_CHARS} chars) from {len(files)} "
                   f"standard-library files; "
                   f"{len(documents)} documents, {n_chars} characters")
    return EmbeddedCorpus(documents=documents, description=description, sha256=documents_sha256(documents),
                          python_version=sys.version)


def _not_utf8(where: str, error: UnicodeDecodeError, unit: str) -> ValueError:
    """`error` decoding `unit` ("file", "line", "value") at `where`, as one line saying what is allowed."""
    return ValueError(f"{where} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                      f"{error.start} of the {unit}): data files must be UTF-8 text")


def _text_of(row: dict, text_field: str, where: str) -> str:
    """The document text in `row[text_field]`; ValueError naming `where` if it is missing or not a str."""
    if text_field not in row:
        raise ValueError(f"{where} has no field {text_field!r} (data.text_field); that row has the fields "
                         f"{sorted(row)}")
    text = row[text_field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise ValueError(f"{where}: field {text_field!r} holds {kind}, expected a string")
    return text


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    """The whole file as one document (universal newlines: "\\r\\n" and "\\r" read as "\\n")."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1  # read() decodes the whole file at once
        raise _not_utf8(f"data file {str(path)!r} line {line}", error, "file") from None
    yield text


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """`row[text_field]` of every line holding a JSON object, in order; blank lines are skipped."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"data file {str(path)!r} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(where, error, "line") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not JSON ({error.msg} at column {error.colno}): a .jsonl file "
                                 "holds one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where} holds a JSON {type(row).__name__}, not an object with the field "
                                 f"{text_field!r} (data.text_field)")
            yield _text_of(row, text_field, where)


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The column `text_field` of every row, in order, read one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as error:
        raise ValueError(f"data file {str(path)!r} is not a Parquet file ({error})") from None
    fields = parquet.schema_arrow.names
    if text_field not in fields:  # a Parquet schema is shared by every row: name the file, not a row
        raise ValueError(f"data file {str(path)!r} has no field {text_field!r} (data.text_field); its rows have "
                         f"the fields {sorted(fields)}")
    number = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        column = batch.column(0)
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:
            for offset in range(len(column)):  # only on failure: find the row to name
                try:
                    column[offset].as_py()
                except UnicodeDecodeError as error:
                    raise _not_utf8(f"data file {str(path)!r} row {number + offset + 1}", error, "value") from None
            raise
        for value in values:
            number += 1
            yield _text_of({text_field: value}, text_field, f"data file {str(path)!r} row {number}")


FILE_READERS: dict[str, Callable[[Path, str], Iterator[str]]] = {
    ".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
"""Allowed local file extensions and the reader of each: (path, text_field) -> documents in order."""


def resolve_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The local files named by `paths`, in the given order; a folder stands for its allowed files (recursive,
    sorted by relative path; files with other extensions in a folder are not part of the corpus).

    Raises FileNotFoundError naming every missing path, and ValueError naming every file whose extension is
    not in FILE_READERS, before anything is read.
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"paths must be a list of paths, got the single path {str(paths)!r}")
    missing = [str(path) for path in paths if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} data path(s) do not exist: {missing}")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [child for child in path.rglob("*") if child.is_file() and child.suffix in FILE_READERS]
            found.sort(key=lambda child: child.relative_to(path).as_posix())
            if not found:
                raise ValueError(f"folder {str(path)!r} holds no file with an allowed extension "
                                 f"{sorted(FILE_READERS)}")
            files.extend(found)
        else:
            files.append(path)
    unsupported = [str(path) for path in files if path.suffix not in FILE_READERS]
    if unsupported:
        raise ValueError(f"unsupported data file extension(s) in {unsupported}; "
                         f"allowed: {sorted(FILE_READERS)}")
    if not files:
        raise ValueError("paths is empty: source 'files' needs at least one .txt/.jsonl/.parquet file "
                         "or folder")
    return files


def iter_file_documents(files: Sequence[Path], text_field: str) -> Iterator[str]:
    """Documents of local files in order: a whole `.txt` file is one document, a `.jsonl` line or `.parquet`
    row is one document (its `text_field`).

    Raises ValueError naming the file and line (or row) when a file is not UTF-8 text, a `.jsonl` line is not
    a JSON object, or a row lacks `text_field` or holds no string there.
    """
    for path in files:
        yield from FILE_READERS[path.suffix](path, text_field)


def hub_fetch_error(what: str, error: Exception, local_copy: str) -> ValueError:
    """One line for a hub resource (`what`) that could not be fetched; a network failure names `local_copy`, what
    to use offline instead."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    message = str(error).strip()
    detail = type(error).__name__ + (f": {message.splitlines()[0]}" if message else "")
    # huggingface_hub reports an unreachable host (or HF_HUB_OFFLINE) with a cache miss as LocalEntryNotFoundError.
    if isinstance(error, (ConnectionError, TimeoutError, LocalEntryNotFoundError)):
        return ValueError(f"{what} cannot be fetched ({detail}): it needs network access to the Hugging Face Hub, "
                          f"or a local copy ({local_copy})")
    return ValueError(f"{what} cannot be loaded ({detail})")


def _hub_rows(path: str, name: str | None, split: str, what: str) -> Iterator[dict]:
    """The rows of a hub data set, streamed; a failure to open or read it is one ValueError naming it."""
    import datasets

    try:
        yield from datasets.load_dataset(path, name, split=split, streaming=True)
    except (OSError, ValueError) as error:  # unreachable host, offline mode, unknown data set, config or split
        raise hub_fetch_error(what, error, "data=files 'data.paths=[...]'") from None


def iter_hub_documents(path: str, name: str | None, split: str, text_field: str) -> Iterator[str]:
    """Documents of a hub data set, streamed (network needed): `row[text_field]` of each row in order.

    Raises ValueError naming the data set when it cannot be fetched (e.g. offline), and naming the row when it
    lacks `text_field` or holds no string there.
    """
    what = f"hub data set {path!r} ({name}, split {split})"
    for number, row in enumerate(_hub_rows(path, name, split, what), start=1):
        yield _text_of(row, text_field, f"{what} row {number}")
