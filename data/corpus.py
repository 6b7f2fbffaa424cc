"""Where documents come from: the embedded default corpus (built offline), local files, hub streams.

The embedded corpus is the text of the interactive-help topics (`pydoc_data.topics.topics`), followed by
the prose of the standard-library sources: module, class and function docstrings (read with `ast`, the modules
are never imported) and blocks of consecutive full-line comments. No network, no download, no file written.
The text differs across Python versions, so callers record `sys.version` next to the corpus sha256.

Local files (`.txt`: one document per file; `.jsonl` / `.parquet`: one document per row) and hub data sets
are streamed through `datasets.load_dataset(..., streaming=True)`, so nothing is copied into a cache.
`datasets` is imported only when those sources are read (it is slow to import).
"""

from __future__ import annotations

import ast
import gc
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
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

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
"""Allowed local file extensions and the `datasets` builder that reads each."""

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


def resolve_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The local files named by `paths`, in the given order; a folder stands for its allowed files (recursive,
    sorted by relative path; files with other extensions in a folder are not part of the corpus).

    Raises FileNotFoundError naming every missing path, and ValueError naming every file whose extension is
    not in FILE_BUILDERS, before anything is read.
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"paths must be a list of paths, got the single path {str(paths)!r}")
    missing = [str(path) for path in paths if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} data path(s) do not exist: {missing}")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [child for child in path.rglob("*") if child.is_file() and child.suffix in FILE_BUILDERS]
            found.sort(key=lambda child: child.relative_to(path).as_posix())
            if not found:
                raise ValueError(f"folder {str(path)!r} holds no file with an allowed extension "
                                 f"{sorted(FILE_BUILDERS)}")
            files.extend(found)
        else:
            files.append(path)
    unsupported = [str(path) for path in files if path.suffix not in FILE_BUILDERS]
    if unsupported:
        raise ValueError(f"unsupported data file extension(s) in {unsupported}; "
                         f"allowed: {sorted(FILE_BUILDERS)}")
    if not files:
        raise ValueError("paths is empty: source 'files' needs at least one .txt/.jsonl/.parquet file "
                         "or folder")
    return files


def _text_of(row: dict, text_field: str, where: str) -> str:
    """The document text in `row[text_field]`, with an error naming `where` if it is missing or not a str."""
    if text_field not in row:
        raise KeyError(f"{where} has no field {text_field!r}; fields are {sorted(row)} (set data.text_field)")
    text = row[text_field]
    if not isinstance(text, str):
        raise TypeError(f"{where}: field {text_field!r} holds {type(text).__name__}, expected str")
    return text


def iter_file_documents(files: Sequence[Path], text_field: str) -> Iterator[str]:
    """Documents of local files in order: a whole `.txt` file is one document, a `.jsonl`/`.parquet` row is
    one document (its `text_field`). Runs of files with one extension are read by one streaming loader."""
    import datasets

    start = 0
    while start < len(files):
        builder = FILE_BUILDERS[files[start].suffix]
        stop = start
        while stop < len(files) and FILE_BUILDERS[files[stop].suffix] == builder:
            stop += 1
        group = [str(path) for path in files[start:stop]]
        options = {"sample_by": "document"} if builder == "text" else {}
        stream = datasets.load_dataset(builder, data_files=group, split="train", streaming=True, **options)
        field = "text" if builder == "text" else text_field  # the text loader always names its column "text"
        where = group[0] if len(group) == 1 else f"{builder} files {group[0]!r} .. {group[-1]!r}"
        for row in stream:
            yield _text_of(row, field, where)
        start = stop


def iter_hub_documents(path: str, name: str | None, split: str, text_field: str) -> Iterator[str]:
    """Documents of a hub data set, streamed (network needed): `row[text_field]` of each row in order."""
    import datasets

    stream = datasets.load_dataset(path, name, split=split, streaming=True)
    for row in stream:
        yield _text_of(row, text_field, f"hub data set {path!r} ({name}, {split})")
