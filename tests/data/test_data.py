"""Tests of the data pipeline: embedded corpus, prepare (shards + meta), verified loading, windows, CLI."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bitlaw.data.corpus as corpus
import bitlaw.data.shards as data
from bitlaw.data.config import DataConfig
from bitlaw.data.corpus import EmbeddedCorpus, build_embedded_corpus, documents_sha256, hub_fetch_error
from bitlaw.data.shards import (
    dataset_dir,
    is_validation_document,
    load_prepared,
    prepare_data,
    train_bpe,
)
from bitlaw.data.windows import TokenStream, WindowSampler, val_batches

REPO_ROOT = Path(__file__).resolve().parents[2]
# Words without q, v, x, z so that a held-out word made of those letters is unseen by the BPE trainer.
WORDS = ("the cat sat on a mat and the dog ran to the house in the garden while light fell on the small "
         "green stone by the old tree; birds sang each morning, night came late, "
         "café naïve über 日本 🙂").split()
UNSEEN_WORD = "qzvxqzvx"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", "..."])


def _document(rng: random.Random) -> str:
    paragraphs = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 5)))
                  for _ in range(rng.randint(1, 3))]
    return "\n\n".join(paragraphs) + rng.choice(["", "\n", "  \n\tindented line\n"])


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str], int]:
    """(paths, documents in source order, index of the one held-out document full of UNSEEN_WORD)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1234)
    paths, documents = [], []
    for number in range(12):  # .txt: one document per file
        text = _document(rng)
        path = root / f"doc_{number:02d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(str(path))
        documents.append(text)
    rows = [_document(rng) for _ in range(60)]
    unseen_index = len(documents) + len(rows)
    nonce = 0  # pick a nonce that puts the UNSEEN_WORD document into the validation split
    while not is_validation_document(unseen_index, _unseen_document(nonce), 0.25, seed=0):
        nonce += 1
    rows.append(_unseen_document(nonce))
    jsonl = root / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": row}) + "\n" for i, row in enumerate(rows)),
                     encoding="utf-8")
    paths.append(str(jsonl))
    documents.extend(rows)
    parquet_rows = [_document(rng) for _ in range(10)]
    pq.write_table(pa.table({"text": parquet_rows, "n": list(range(10))}), root / "rows.parquet")
    paths.append(str(root / "rows.parquet"))
    documents.extend(parquet_rows)
    return paths, documents, unseen_index


def _unseen_document(nonce: int) -> str:
    return f"Held out {nonce}: " + " ".join([UNSEEN_WORD] * 200)


def _files_config(paths: list[str], cache_dir: Path, **overrides: object) -> DataConfig:
    settings = dict(name="local", source="files", paths=list(paths), bpe_vocab_size=300, val_fraction=0.25,
                    shard_tokens=1000, cache_dir=str(cache_dir))
    settings.update(overrides)
    return DataConfig(**settings)  # type: ignore[arg-type]


def _decode_documents(tokens: TokenStream, eos_id: int, tokenizer_path: Path) -> list[str]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ids = np.asarray(tokens[0:len(tokens)], dtype=np.int64)
    assert len(ids) and ids[-1] == eos_id, "every document, the last included, must end with EOS"
    ends = np.flatnonzero(ids == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False)
            for start, end in zip(starts, ends, strict=True)]


@pytest.fixture(scope="module")
def prepared_local(local_corpus, tmp_path_factory: pytest.TempPathFactory) -> data.PreparedData:
    paths, _, _ = local_corpus
    return prepare_data(_files_config(paths, tmp_path_factory.mktemp("cache")), progress=False)


@pytest.fixture(scope="module")
def embedded_corpus() -> EmbeddedCorpus:
    return build_embedded_corpus()


# ----------------------------------------------------------------------------------------- embedded corpus

def test_embedded_corpus_is_deterministic_prose(embedded_corpus: EmbeddedCorpus) -> None:
    again = build_embedded_corpus()
    assert again.documents == embedded_corpus.documents and again.sha256 == embedded_corpus.sha256
    assert embedded_corpus.sha256 == documents_sha256(embedded_corpus.documents)
    # 3.11's installation holds about 2.25 MB of such prose (see the report); newer versions hold more.
    assert embedded_corpus.n_bytes >= 2_000_000
    assert len(embedded_corpus.documents) > 1000
    assert all(isinstance(doc, str) and doc.strip() for doc in embedded_corpus.documents)
    text = "".join(embedded_corpus.documents[:500])
    assert sum(ch.isalpha() or ch.isspace() for ch in text) / len(text) > 0.85, "expected prose, not code"
    assert " the " in text and embedded_corpus.python_version == sys.version
    assert sys.version.split()[0] in embedded_corpus.description


# --------------------------------------------------------------------------------------------- prepare

def test_prepare_round_trip_split_and_meta(local_corpus, prepared_local: data.PreparedData) -> None:
    _, documents, unseen_index = local_corpus
    prepared = prepared_local
    is_val = [is_validation_document(i, doc, 0.25, seed=0) for i, doc in enumerate(documents)]
    expected_train = [doc for doc, held in zip(documents, is_val, strict=True) if not held]
    expected_val = [doc for doc, held in zip(documents, is_val, strict=True) if held]
    assert 0 < len(expected_val) < len(expected_train)
    decoded_train = _decode_documents(prepared.train_tokens, prepared.eos_id, prepared.tokenizer_path)
    assert decoded_train == expected_train
    assert _decode_documents(prepared.val_tokens, prepared.eos_id, prepared.tokenizer_path) == expected_val

    meta = json.loads((prepared.directory / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300 and meta["eos_id"] == 0
    assert meta["documents"] == {"train": len(expected_train), "val": len(expected_val)}
    assert meta["tokens"] == {"train": len(prepared.train_tokens), "val": len(prepared.val_tokens)}
    assert meta["corpus"]["sha256"] == documents_sha256(documents)
    assert len(meta["shards"]["train"]) > 1, "shard_tokens=1000 must split the training tokens"
    assert all(record["tokens"] <= 1000 for record in meta["shards"]["train"])
    raw = np.concatenate([np.fromfile(prepared.directory / record["file"], dtype="<u2")
                          for record in meta["shards"]["train"]])
    assert np.array_equal(prepared.train_tokens[0:len(raw)], raw)
    for start, stop in [(990, 1010), (0, 1000), (1000, 2001), (5, 5), (len(raw) - 3, len(raw) + 50)]:
        assert np.array_equal(prepared.train_tokens[start:stop], raw[start:stop])
    assert prepared.train_tokens[1000] == raw[1000] and prepared.train_tokens[-1] == raw[-1]
    counts = np.bincount(raw, minlength=300)
    p = counts[counts > 0] / counts.sum()
    assert prepared.unigram_entropy_nats == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert meta["unigram_entropy"]["bits"] == pytest.approx(prepared.unigram_entropy_nats / math.log(2))

    # The BPE saw training documents only: the held-out word got no merges. Trained on everything, it would.
    tokenizer = prepared_local.load_tokenizer()
    assert is_val[unseen_index] and all(UNSEEN_WORD not in doc for doc in expected_train)
    assert len(tokenizer.encode(" " + UNSEEN_WORD).ids) >= 4
    leaky = train_bpe(iter(documents), 300, "<|endoftext|>")
    assert len(leaky.encode(" " + UNSEEN_WORD).ids) <= 2


def test_prepare_is_idempotent_and_config_changes_make_new_data(local_corpus, prepared_local, monkeypatch,
                                                                tmp_path: Path) -> None:
    paths, _, _ = local_corpus
    cfg = _files_config(paths, Path(prepared_local.meta["config"]["cache_dir"]))
    files = sorted(prepared_local.directory.iterdir())
    stamps = {path.name: path.stat().st_mtime_ns for path in files}

    def no_tokenizing(*args: object) -> None:
        raise AssertionError("prepare_data re-tokenized a data set that was already prepared")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_encode_chunk", no_tokenizing)
        again = prepare_data(cfg, progress=False)
    assert again.reused and again.directory == prepared_local.directory
    assert {path.name: path.stat().st_mtime_ns for path in sorted(again.directory.iterdir())} == stamps

    for change in ({"bpe_vocab_size": 301}, {"val_fraction": 0.3}, {"seed": 1}, {"max_documents": 50},
                   {"shard_tokens": 999}, {"text_field": "body"}):
        changed = dataset_dir(_files_config(paths, tmp_path, **change))
        assert changed.name != prepared_local.directory.name, change
    assert dataset_dir(_files_config(paths[:-1], tmp_path)).name != prepared_local.directory.name
    # Where the data lives is not part of its identity.
    assert dataset_dir(_files_config(paths, tmp_path)).name == prepared_local.directory.name

    # Preparing is deterministic: the same config elsewhere gives byte-identical shards and tokenizer.
    elsewhere = prepare_data(_files_config(paths, tmp_path / "elsewhere"), progress=False)
    assert elsewhere.meta["shards"] == prepared_local.meta["shards"]
    assert elsewhere.tokenizer_path.read_bytes() == prepared_local.tokenizer_path.read_bytes()

    # A tokenizer file gives the same tokens as the BPE it came from, in a new folder.
    from_file = prepare_data(_files_config(paths, tmp_path, tokenizer=str(prepared_local.tokenizer_path)),
                             progress=False)
    assert from_file.directory.name != prepared_local.directory.name
    assert np.array_equal(from_file.train_tokens[0:len(from_file.train_tokens)],
                          prepared_local.train_tokens[0:len(prepared_local.train_tokens)])

    # Editing an input file changes the fingerprint, so stale tokens are never reused.
    copy = tmp_path / "copy.txt"
    shutil.copy(paths[0], copy)
    before = dataset_dir(_files_config([str(copy)], tmp_path))
    copy.write_text("changed text", encoding="utf-8")
    assert dataset_dir(_files_config([str(copy)], tmp_path)) != before


def test_prepare_embedded_corpus(embedded_corpus: EmbeddedCorpus, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "build_embedded_corpus", lambda: embedded_corpus)  # built once per module
    cfg = DataConfig(bpe_vocab_size=512, max_documents=300, cache_dir=str(tmp_path))
    prepared = prepare_data(cfg, progress=False)
    documents = embedded_corpus.documents[:300]
    expected_train = [doc for i, doc in enumerate(documents) if not is_validation_document(i, doc, 0.1)]
    decoded_train = _decode_documents(prepared.train_tokens, prepared.eos_id, prepared.tokenizer_path)
    assert decoded_train == expected_train
    assert prepared.vocab_size == 512 and prepared.meta["documents"]["val"] == 300 - len(expected_train)
    assert prepared.meta["corpus"]["python_version"] == sys.version
    assert prepared.meta["corpus"]["sha256"] == documents_sha256(documents)
    assert 3.0 < prepared.unigram_entropy_nats < math.log(512)
    assert prepared.directory.parent == tmp_path
    assert prepared.directory.name.startswith("embedded-") and len(prepared.directory.name) == 9 + 12


# ----------------------------------------------------------------------------------------- load errors

@pytest.fixture()
def copied(prepared_local, tmp_path: Path) -> Path:
    """A private copy of the prepared local data set, to damage."""
    return Path(shutil.copytree(prepared_local.directory, tmp_path / "copy"))


def _edit_meta(directory: Path, **changes: object) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    (directory / "meta.json").write_text(json.dumps(meta))


def test_missing_or_unsupported_paths_fail_before_tokenizing(local_corpus, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "_encode_chunk", lambda *a: pytest.fail("tokenized despite a bad config"))
    paths, _, _ = local_corpus
    missing = [str(tmp_path / "gone_a.txt"), str(tmp_path / "gone_b.jsonl")]
    with pytest.raises(FileNotFoundError, match="gone_a.txt") as error:
        prepare_data(_files_config([paths[0], *missing], tmp_path), progress=False)
    assert "gone_b.jsonl" in str(error.value)
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"table\.csv.*allowed.*\.jsonl.*\.parquet.*\.txt"):
        prepare_data(_files_config([paths[0], str(tmp_path / "table.csv")], tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        load_prepared(tmp_path / "never_prepared")
    with pytest.raises(ValueError, match="data.source='web'"):
        DataConfig(source="web").validate()


def test_load_detects_missing_truncated_and_corrupt_shards(copied: Path) -> None:
    shard = copied / "train_001.bin"
    original = shard.read_bytes()
    shard.write_bytes(original[:-2])
    message = rf"train_001\.bin.* {len(original) - 2} bytes, expected {len(original)}"
    with pytest.raises(ValueError, match=message):
        load_prepared(copied)
    flipped = bytearray(original)
    flipped[7] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"train_001\.bin.*corrupt"):
        load_prepared(copied)
    assert len(load_prepared(copied, verify="size").train_tokens) > 0  # size-only checks skip hashing
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"train_001\.bin"):
        load_prepared(copied)


def test_load_rejects_unknown_format_and_oversized_vocab(copied: Path) -> None:
    _edit_meta(copied, format_version=99)
    with pytest.raises(ValueError, match="format_version 99.*reads format_version 1"):
        load_prepared(copied)
    _edit_meta(copied, format_version=1, vocab_size=70_000)
    with pytest.raises(ValueError, match="vocab_size 70000 does not fit dtype uint16"):
        load_prepared(copied)
    _edit_meta(copied, vocab_size=400)  # fits uint16 but disagrees with tokenizer.json
    with pytest.raises(ValueError, match="tokenizer.*300 ids.*vocab_size 400"):
        load_prepared(copied)


def test_crash_mid_prepare_keeps_previous_data(local_corpus, prepared_local, monkeypatch, tmp_path) -> None:
    paths, _, _ = local_corpus
    cache = tmp_path / "cache"
    cfg = _files_config(paths, cache)
    first = prepare_data(cfg, progress=False)
    shards = {path.name: path.read_bytes() for path in first.directory.iterdir()}
    calls = []

    def crash_on_second_chunk(tokenizer, texts):  # fail after some shards were already written
        calls.append(len(texts))
        if len(calls) > 1:
            raise RuntimeError("simulated crash while tokenizing")
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]

    monkeypatch.setattr(data, "_ENCODE_CHUNK_DOCUMENTS", 8)
    monkeypatch.setattr(data, "_encode_chunk", crash_on_second_chunk)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_data(cfg, force=True, progress=False)
    assert {path.name: path.read_bytes() for path in first.directory.iterdir()} == shards
    assert len(load_prepared(cfg, verify="full").train_tokens) == len(first.train_tokens)
    assert sorted(path.name for path in cache.iterdir()) == [first.directory.name], "staging left behind"

    fresh = _files_config(paths, cache, seed=7)  # a crash on a new config leaves nothing that looks prepared
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_data(fresh, progress=False)
    assert not dataset_dir(fresh).exists()
    monkeypatch.undo()
    assert not prepare_data(fresh, progress=False).reused


# ------------------------------------------------------------------------------------- bad input files

def _fails_writing_nothing(cfg: DataConfig, match: str, new_root: Path) -> str:
    """prepare_data(cfg) raises ValueError matching `match`, and `new_root` (above cfg.cache_dir, absent
    before) is still absent: nothing was written, or what was written is gone. Returns the message."""
    assert not new_root.exists()
    with pytest.raises(ValueError, match=match) as error:
        prepare_data(cfg, progress=False)
    assert not new_root.exists(), f"left behind: {sorted(new_root.rglob('*'))}"
    assert len(str(error.value).splitlines()) == 1
    return str(error.value)


def test_non_utf8_data_files_are_named_with_their_line(local_corpus, prepared_local, monkeypatch,
                                                       tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, _, _ = local_corpus
    new_root = tmp_path / "new"

    def cfg(files: list[Path], **overrides: object) -> DataConfig:  # good .txt files, then the bad ones
        return _files_config([*paths[:12], *map(str, files)], new_root / "cache", **overrides)

    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\nCafé crème\n".encode("latin-1"))
    _fails_writing_nothing(cfg([latin]), rf"data file '{re.escape(str(latin))}' line 2 is not UTF-8 text "
                           r"\(byte 0xe9 at offset 14 of the file\): data files must be UTF-8 text", new_root)
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "caf\xe9"}\n{"text": "four"}\n')
    message = rf"data file '{re.escape(str(rows))}' line 3 is not UTF-8 text .*must be UTF-8 text"
    _fails_writing_nothing(cfg([rows]), message, new_root)
    # With a tokenizer file the bad line is met while tokenizing, after shards were written: they are removed.
    monkeypatch.setattr(data, "_ENCODE_CHUNK_DOCUMENTS", 1)
    _fails_writing_nothing(cfg([rows], tokenizer=str(prepared_local.tokenizer_path)), message, new_root)
    # A Parquet string column holding invalid UTF-8 (written as raw buffers: pyarrow validates its own strings).
    offsets, values = np.array([0, 2, 6], dtype=np.int32).tobytes(), b"okcaf\xe9"
    column = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(offsets), pa.py_buffer(values)])
    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": column}), table)
    _fails_writing_nothing(cfg([table]), rf"'{re.escape(str(table))}' row 2 is not UTF-8 text", new_root)


def test_rows_without_the_text_field_are_named(local_corpus, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, _, _ = local_corpus
    new_root = tmp_path / "new"

    def cfg(files: list[Path], **overrides: object) -> DataConfig:  # good .txt files, then the bad ones
        return _files_config([*paths[:12], *map(str, files)], new_root / "cache", **overrides)

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n\n{"body": "two", "id": 2}\n', encoding="utf-8")
    _fails_writing_nothing(cfg([rows]), rf"data file '{re.escape(str(rows))}' line 3 has no field 'text' "
                           r"\(data.text_field\); that row has the fields \['body', 'id'\]$", new_root)
    _fails_writing_nothing(cfg([rows], text_field="body"), r"line 1 has no field 'body'.*\['text'\]", new_root)
    for line, problem in [('{"text": null}', "line 1: field 'text' holds null, expected a string"),
                          ('{"text": 5}', "line 1: field 'text' holds int, expected a string"),
                          ('["text"]', "line 1 holds a JSON list, not an object with the field 'text'"),
                          ('{"text": "unterminated', "line 1 is not JSON")]:
        rows.write_text(line + "\n", encoding="utf-8")
        _fails_writing_nothing(cfg([rows]), re.escape(f"'{rows}' {problem}"), new_root)
    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"body": ["a b c"], "n": [1]}), table)
    _fails_writing_nothing(cfg([table]), rf"data file '{re.escape(str(table))}' has no field 'text' "
                           r"\(data.text_field\); its rows have the fields \['body', 'n'\]", new_root)
    pq.write_table(pa.table({"text": ["a b c", None]}), table)
    _fails_writing_nothing(cfg([table]), "row 2: field 'text' holds null", new_root)
    table.write_bytes(b"not parquet at all")
    _fails_writing_nothing(cfg([table]), rf"'{re.escape(str(table))}' is not a Parquet file", new_root)


def test_hub_rows_without_the_text_field_are_named(monkeypatch) -> None:
    monkeypatch.setattr(corpus, "_hub_rows", lambda *args: iter([{"text": "a"}, {"content": "b", "url": "u"}]))
    documents = corpus.iter_hub_documents("org/set", "en", "train", "text")
    assert next(documents) == "a"
    with pytest.raises(ValueError, match=r"hub data set 'org/set' \(en, split train\) row 2 has no field 'text' "
                                         r"\(data.text_field\); that row has the fields \['content', 'url'\]"):
        next(documents)


def test_input_without_text_says_so_and_names_the_files(local_corpus, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "train_bpe", lambda *args: pytest.fail("trained a tokenizer on no documents"))
    new_root = tmp_path / "new"
    empty_txt, blank_jsonl = tmp_path / "empty.txt", tmp_path / "blank.jsonl"
    empty_txt.write_text("", encoding="utf-8")
    blank_jsonl.write_text('\n{"text": ""}\n{"text": "  \\n"}\n', encoding="utf-8")
    message = _fails_writing_nothing(
        _files_config([str(empty_txt), str(blank_jsonl)], new_root / "cache"),
        re.escape(f"the input has no documents with text (2 local file(s): {empty_txt}, {blank_jsonl}): every "
                  "document is empty or blank"), new_root)
    assert "validation" not in message
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    _fails_writing_nothing(_files_config([str(tmp_path / "empty.jsonl")], new_root / "cache"),
                           "the input has no documents with text", new_root)
    paths, _, _ = local_corpus  # text after the first max_documents does not count
    _fails_writing_nothing(_files_config([str(empty_txt), *paths], new_root / "cache", max_documents=1),
                           r"every document \(the first data.max_documents=1\) is empty", new_root)


def test_read_only_cache_dir_fails_before_tokenizing(local_corpus, prepared_local, monkeypatch,
                                                     tmp_path: Path) -> None:
    paths, _, _ = local_corpus
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copytree(prepared_local.directory, cache / prepared_local.directory.name)
    cache.chmod(0o555)
    try:
        if os.access(cache, os.W_OK):  # root ignores permission bits: answer as they would for other users
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: real_access(path, mode, **kwargs)
                                and not (mode & os.W_OK and Path(path) == cache))
        assert prepare_data(_files_config(paths, cache), progress=False).reused, "reading needs no writing"
        monkeypatch.setattr(data, "_documents", lambda *args: pytest.fail("read documents for a read-only cache"))
        for cache_dir in (cache, cache / "sub" / "dir"):
            with pytest.raises(ValueError, match=rf"^data.cache_dir='{re.escape(str(cache_dir))}' is not "
                                                 rf"writable: '{re.escape(str(cache))}' is read-only"):
                prepare_data(_files_config(paths, cache_dir, seed=5), progress=False)
        assert [path.name for path in cache.iterdir()] == [prepared_local.directory.name]
    finally:
        cache.chmod(0o755)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=rf"data.cache_dir='{re.escape(str(a_file / 'c'))}': .* is a file"):
        prepare_data(_files_config(paths, a_file / "c"), progress=False)


@pytest.mark.parametrize("umask", [0o027, 0o002], ids=["umask027", "umask002"])
def test_written_files_and_folders_follow_the_umask(local_corpus, tmp_path: Path, umask: int) -> None:
    paths, _, _ = local_corpus
    root = tmp_path / "cache"
    previous = os.umask(umask)
    try:
        prepared = prepare_data(_files_config(paths[:13], root / "nested"), progress=False)
    finally:
        os.umask(previous)
    written = [root, *root.rglob("*")]
    assert {path.name for path in prepared.directory.iterdir()} >= {"meta.json", "tokenizer.json", "train_000.bin"}
    modes = {str(path): oct(stat.S_IMODE(path.stat().st_mode)) for path in written}
    assert modes == {str(path): oct((0o777 if path.is_dir() else 0o666) & ~umask) for path in written}


# ----------------------------------------------------------------------------------------- windows

def _window_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    """With tokens = arange, a window's first token tells which window it is."""
    return (x[:, 0] // seq_len).tolist()


def test_window_sampler_is_deterministic_and_shifted() -> None:
    tokens = np.arange(2001, dtype=np.uint32)
    sampler = WindowSampler(tokens, seq_len=16, global_batch=8, seed=3)
    x, y = sampler.batch(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal((x - x[:, :1]), torch.arange(16).expand(8, 16)), "windows are contiguous token runs"
    assert torch.equal(x[:, 0] % 16, torch.zeros(8, dtype=torch.int64)), "window i starts at i * seq_len"
    again = WindowSampler(tokens, seq_len=16, global_batch=8, seed=3).batch(5)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(WindowSampler(tokens, seq_len=16, global_batch=8, seed=4).batch(5)[0], x)
    assert not torch.equal(sampler.batch(6)[0], x)


def test_window_sampler_ranks_partition_the_global_batch() -> None:
    tokens = np.arange(4001, dtype=np.uint32)
    sampler = WindowSampler(tokens, seq_len=10, global_batch=12, seed=0)
    for step in (0, 7, 33):  # 400 windows / 12 per step: step 33 straddles the epoch boundary
        whole_x, whole_y = sampler.batch(step)
        for world in (2, 3, 4):
            parts = [sampler.batch(step, rank, world) for rank in range(world)]
            assert all(part[0].shape == (12 // world, 10) for part in parts)
            assert torch.equal(torch.cat([part[0] for part in parts]), whole_x)
            assert torch.equal(torch.cat([part[1] for part in parts]), whole_y)


def test_window_sampler_covers_each_epoch_without_repeats_and_resumes_exactly() -> None:
    tokens = np.arange(961, dtype=np.uint32)  # 96 windows of 10 (+1): 12 steps of 8 per epoch
    sampler = WindowSampler(tokens, seq_len=10, global_batch=8, seed=11)
    epochs = [[w for step in range(e * 12, (e + 1) * 12) for w in _window_ids(sampler.batch(step)[0], 10)]
              for e in range(3)]
    for windows in epochs:
        assert sorted(windows) == list(range(96))
    assert epochs[0] != epochs[1] != epochs[2]
    fresh = WindowSampler(tokens, seq_len=10, global_batch=8, seed=11)  # a resumed run: no earlier steps
    for step in (30, 0, 13):
        assert torch.equal(fresh.batch(step, 1, 2)[0], sampler.batch(step, 1, 2)[0])

    odd = WindowSampler(np.arange(101, dtype=np.uint32), seq_len=10, global_batch=3, seed=0)  # 10 windows
    seen = [w for step in range(10) for w in _window_ids(odd.batch(step)[0], 10)]  # 3 epochs in 30 draws
    assert all(sorted(seen[e * 10:(e + 1) * 10]) == list(range(10)) for e in range(3))


def test_window_sampler_over_shards_and_errors() -> None:
    tokens = np.arange(1001, dtype=np.uint16)
    stream = TokenStream([tokens[:333], tokens[333:334], tokens[334:]])
    for step in range(5):
        assert torch.equal(WindowSampler(stream, 20, 4, 1).batch(step)[0],
                           WindowSampler(tokens, 20, 4, 1).batch(step)[0])
    with pytest.raises(ValueError, match="global_batch=6 is not divisible by world_size=4"):
        WindowSampler(tokens, 20, 6, 0).batch(0, 0, 4)
    with pytest.raises(ValueError, match="50 windows.*fewer than global_batch=64"):
        WindowSampler(tokens, 20, 64, 0)
    with pytest.raises(ValueError, match="rank=2"):
        WindowSampler(tokens, 20, 4, 0).batch(0, 2, 2)


def test_val_batches_are_the_first_windows_in_order() -> None:
    tokens = np.arange(95, dtype=np.uint16)  # 9 windows of 10 (+1)
    batches = val_batches(tokens, seq_len=10, batch_size=4)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 1]
    assert torch.equal(torch.cat([x for x, _ in batches])[:, 0], torch.arange(0, 90, 10))
    assert all(torch.equal(y[:, :-1], x[:, 1:]) for x, y in batches)
    assert len(val_batches(tokens, 10, 4, max_batches=2)) == 2
    assert torch.equal(val_batches(tokens, 10, 4)[0][0], batches[0][0])
    with pytest.raises(ValueError, match="no window"):
        val_batches(tokens[:5], 10, 4)


# ----------------------------------------------------------------------------------------------- CLI

def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "bitlaw.data.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=120)


# One interpreter (imports take seconds) for both hub resources: a hub tokenizer through prepare_data, then
# `bitlaw-prepare data=c4` (hub data set and tokenizer) through the CLI, which exits.
_OFFLINE_SCRIPT = """
import sys
from bitlaw.data.cli import main
from bitlaw.data.config import DataConfig
from bitlaw.data.shards import prepare_data

text_file, cache = sys.argv[1:]
try:
    prepare_data(DataConfig(source="files", paths=[text_file], tokenizer="openai-community/gpt2", cache_dir=cache),
                 progress=False)
except ValueError as error:
    print(error)
sys.argv = ["bitlaw-prepare", "data=c4", f"data.cache_dir={cache}"]
main()
"""


def test_cli_prepares_with_relative_paths_and_writes_nothing_else(local_corpus, tmp_path: Path) -> None:
    paths, documents, _ = local_corpus
    work = tmp_path / "work"
    work.mkdir()
    for path in paths[:4]:
        shutil.copy(path, work)
    names = ",".join(Path(path).name for path in paths[:4])
    result = _run_cli(["data=files", f"data.paths=[{names}]", "data.cache_dir=cache", "data.val_fraction=0.3",
                       "data.bpe_vocab_size=280", "progress=false"], cwd=work)
    assert result.returncode == 0, result.stderr
    meta_files = list((work / "cache").glob("files-*/meta.json"))
    assert len(meta_files) == 1
    meta = json.loads(meta_files[0].read_text())
    assert meta["vocab_size"] == 280 and meta["documents"]["train"] + meta["documents"]["val"] == 4
    assert meta["config"]["paths"] == [str(work / Path(path).name) for path in paths[:4]]
    assert str(meta_files[0].parent) in result.stdout
    assert f"train tokens: {meta['tokens']['train']:,}" in result.stdout
    assert f"val tokens: {meta['tokens']['val']:,}" in result.stdout and "unigram entropy" in result.stdout
    assert sorted(path.name for path in work.iterdir()) == sorted(["cache", *names.split(",")]), \
        "the CLI must not create outputs/ or .hydra/ folders"


def test_cli_rejects_an_unknown_key() -> None:
    result = _run_cli(["data.vocab=3"], cwd=REPO_ROOT)
    assert result.returncode != 0
    assert "vocab" in result.stderr and "not in struct" in result.stderr
    result = _run_cli(["+data.vocab=3"], cwd=REPO_ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("bitlaw-prepare: invalid data config at data.vocab")
    assert "bpe_vocab_size" in result.stderr


def test_hub_sources_offline_fail_with_one_line_before_writing(tmp_path: Path) -> None:
    text_file, cache = tmp_path / "a.txt", tmp_path / "cache"
    text_file.write_text("some text", encoding="utf-8")
    # An empty hub cache: nothing downloaded earlier can stand in for the network. Offline mode fails at once.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(text_file), str(cache)], cwd=tmp_path,
                            env=env, text=True, capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout.startswith("hub tokenizer data.tokenizer='openai-community/gpt2' cannot be fetched (")
    assert result.stdout.rstrip().endswith("it needs network access to the Hugging Face Hub, or a local copy "
                                           "(data.tokenizer=path/to/tokenizer.json)")
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("bitlaw-prepare: hub data set 'allenai/c4' (en, split train) cannot be fetched (")
    assert line.endswith("it needs network access to the Hugging Face Hub, or a local copy "
                         "(data=files 'data.paths=[...]')")
    assert not cache.exists()
    # A failure that is not the network's says only what failed.
    assert str(hub_fetch_error("hub data set 'x/y'", FileNotFoundError("no such data set"), "data=files")) == \
        "hub data set 'x/y' cannot be loaded (FileNotFoundError: no such data set)"
