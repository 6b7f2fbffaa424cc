"""Token data for pretraining: tokenize a corpus once into verified token shards, load them, draw windows.

A prepared data set lives in `<cache_dir>/<name>-<hash 12 hex>/`: `tokenizer.json`, `train_000.bin`, ...,
`val_000.bin`, ... (raw little-endian uint16 token ids when the vocabulary has at most 65536 ids, else
uint32; every document is followed by the EOS id) and `meta.json`, written last. The hash covers every config
field that changes the tokens plus a fingerprint of the inputs (Python version for the embedded corpus, size
and mtime of local files, sha256 of a tokenizer file). Hydra-free: the CLI `train/prepare.py` resolves paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from train.corpus import build_embedded_corpus, iter_file_documents, iter_hub_documents, resolve_files

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SOURCES = ("embedded", "files", "hub")
VERIFY_MODES = ("auto", "full", "size")
FULL_VERIFY_MAX_BYTES = 1 << 30
"""verify="auto" hashes every shard when the data set is smaller than this (1 GiB), else checks sizes only."""
_ENCODE_CHUNK_DOCUMENTS = 256
_NOT_HASHED = ("name", "cache_dir")  # where the data set lives, not what is in it
_META_KEYS = ("config_hash", "vocab_size", "eos_id", "dtype", "shards", "tokens", "tokenizer_file",
              "unigram_entropy")


@dataclass
class DataConfig:
    """What to tokenize and how; every field except `name` and `cache_dir` is part of the data set's hash.

    name: prefix of the data set folder (letters, digits, `.`, `_`, `-`).
    source: "embedded" (CPython docs, offline), "files" (local `paths`) or "hub" (streamed, network).
    paths: for source="files": `.txt` files (one document each), `.jsonl` / `.parquet` files (one document per
        row, column `text_field`) or folders of them. Relative paths resolve against the current directory.
    text_field: the column holding the text in `.jsonl` / `.parquet` rows and hub rows.
    hub_path, hub_name, hub_split: the hub data set for source="hub" (e.g. "allenai/c4", "en", "train").
    max_tokens: stop after the document that brings the token count (train + val, EOS included) to this many;
        required for source="hub". None: no limit.
    max_documents: use only the first this many documents of the source. None: all.
    tokenizer: "bpe" (train a byte-level BPE on the training documents), a path ending in `.json` (a
        `tokenizers` file) or a hub tokenizer name such as "openai-community/gpt2" (network).
    bpe_vocab_size: vocabulary size of the trained BPE, EOS included (only with tokenizer="bpe").
    eos_token: the special token that ends every document; must be in the tokenizer's vocabulary.
    val_fraction: probability that a document is held out for validation (decided by a hash of its index and
        text, see `is_validation_document`). 0 gives no validation split.
    shard_tokens: tokens per shard file (the last shard of a split holds the rest).
    cache_dir: folder holding prepared data sets.
    seed: salt of the train/validation split hash.
    """

    name: str = "embedded"
    source: str = "embedded"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    hub_path: str | None = None
    hub_name: str | None = None
    hub_split: str = "train"
    max_tokens: int | None = None
    max_documents: int | None = None
    tokenizer: str = "bpe"
    bpe_vocab_size: int = 4096
    eos_token: str = "<|endoftext|>"
    val_fraction: float = 0.1
    shard_tokens: int = 1 << 24
    cache_dir: str = "data_cache"
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError / FileNotFoundError / TypeError naming the field, value and what is allowed."""
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name or ""):
            raise ValueError(f"data.name={self.name!r}: use letters, digits, '.', '_', '-' (names a folder)")
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {list(SOURCES)}")
        if self.source == "files":
            resolve_files(self.paths)
        elif self.paths:
            raise ValueError(f"data.paths={list(self.paths)} is read only with source='files', "
                             f"not {self.source!r}")
        if self.source == "hub":
            if not self.hub_path:
                raise ValueError("source='hub' needs data.hub_path (e.g. 'allenai/c4')")
            if self.max_tokens is None:
                raise ValueError("source='hub' needs data.max_tokens (a hub corpus is too large to take)")
            if self.tokenizer == "bpe":
                raise ValueError("source='hub' needs a pretrained tokenizer (a tokenizer.json path or a hub "
                                 "name), not 'bpe'")
        for name in ("max_tokens", "max_documents"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name}={value} must be >= 1 or None")
        if not self.tokenizer:
            raise ValueError("data.tokenizer is empty: use 'bpe', a tokenizer.json path or a hub name")
        if self.tokenizer.endswith(".json") and not Path(self.tokenizer).is_file():
            raise FileNotFoundError(f"data.tokenizer={self.tokenizer!r}: no such tokenizer file")
        if self.tokenizer == "bpe" and not 258 <= self.bpe_vocab_size <= 1 << 32:
            raise ValueError(f"data.bpe_vocab_size={self.bpe_vocab_size} must be in [258, 2**32] "
                             "(256 byte tokens + EOS + at least one merge)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.shard_tokens < 1:
            raise ValueError(f"data.shard_tokens={self.shard_tokens} must be >= 1")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed} must be >= 0")
        if not self.eos_token:
            raise ValueError("data.eos_token is empty")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """What identifies the inputs beyond the config, so that changed inputs give a new data set."""
    fingerprint: dict[str, Any] = {}
    if cfg.source == "embedded":
        fingerprint["python_version"] = sys.version  # the corpus is the installation's own documentation
    elif cfg.source == "files":
        fingerprint["files"] = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
                                for path in resolve_files(cfg.paths)]
    if cfg.tokenizer.endswith(".json"):
        fingerprint["tokenizer_sha256"] = _sha256_file(Path(cfg.tokenizer))
    return fingerprint


def config_hash(cfg: DataConfig) -> str:
    """Hex sha256 of the token-affecting config fields, the input fingerprint and the format version."""
    fields = {key: value for key, value in dataclasses.asdict(cfg).items() if key not in _NOT_HASHED}
    fields["paths"] = [str(Path(path).resolve()) for path in cfg.paths]  # "a.txt" and "/abs/a.txt" alike
    key = {"format_version": FORMAT_VERSION, "config": fields, "inputs": input_fingerprint(cfg)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


def dataset_dir(cfg: DataConfig) -> Path:
    """`<cache_dir>/<name>-<first 12 hex of config_hash>` (not necessarily prepared yet)."""
    return Path(cfg.cache_dir) / f"{cfg.name}-{config_hash(cfg)[:12]}"


def is_validation_document(index: int, text: str, val_fraction: float, seed: int = 0) -> bool:
    """True iff document number `index` (0-based, in source order) with this text is held out for validation.

    A stable function of (seed, index, text): sha256, read as a uniform number in [0, 1), below val_fraction.
    """
    digest = hashlib.sha256(f"{seed}\0{index}\0".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") < val_fraction * 2.0**64


def _documents(cfg: DataConfig) -> tuple[Callable[[], Iterator[str]], int | None, str]:
    """A factory of fresh document iterators (each pass starts over), the count if known, a description."""
    if cfg.source == "embedded":
        corpus = build_embedded_corpus()
        documents = corpus.documents[:cfg.max_documents]
        return (lambda: iter(documents)), len(documents), corpus.description
    if cfg.source == "files":
        files = resolve_files(cfg.paths)
        names = ", ".join(str(path) for path in files[:3]) + (", ..." if len(files) > 3 else "")

        def read() -> Iterator[str]:
            return iter_file_documents(files, cfg.text_field)

        description = f"{len(files)} local file(s): {names}"
    else:
        def read() -> Iterator[str]:
            return iter_hub_documents(cfg.hub_path or "", cfg.hub_name, cfg.hub_split, cfg.text_field)

        description = f"hub data set {cfg.hub_path} ({cfg.hub_name}, split {cfg.hub_split})"
    return (lambda: itertools.islice(read(), cfg.max_documents)), None, description


def train_bpe(documents: Iterator[str], vocab_size: int, eos_token: str) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization, no normalization) with `eos_token` as its only special
    token (id 0); deterministic for the same documents in the same order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def _make_tokenizer(cfg: DataConfig, documents: Callable[[], Iterator[str]]) -> Tokenizer:
    if cfg.tokenizer == "bpe":  # trained on training documents only: validation text stays unseen
        train_only = (text for index, text in enumerate(documents())
                      if not is_validation_document(index, text, cfg.val_fraction, cfg.seed))
        return train_bpe(train_only, cfg.bpe_vocab_size, cfg.eos_token)
    if cfg.tokenizer.endswith(".json"):
        return Tokenizer.from_file(cfg.tokenizer)
    return Tokenizer.from_pretrained(cfg.tokenizer)


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if not 1 <= vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, 2**32]")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _encode_chunk(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without the tokenizer's own special tokens (we add EOS ourselves)."""
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


class _ShardWriter:
    """Appends token ids of one split to `<split>_NNN.bin` files of at most shard_tokens ids each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.records: list[dict[str, Any]] = []
        self._handle: Any = None
        self._digest = hashlib.sha256()
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype, copy=False)
        offset = 0
        while offset < len(data):
            if self._handle is None:
                name = f"{self.split}_{len(self.records):03d}.bin"
                self._handle = open(self.directory / name, "wb")
                self._digest, self._count = hashlib.sha256(), 0
                self.records.append({"file": name, "tokens": 0, "sha256": ""})
            take = min(self.shard_tokens - self._count, len(data) - offset)
            block = data[offset:offset + take].tobytes()
            self._handle.write(block)
            self._digest.update(block)
            self._count += take
            offset += take
            if self._count == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        self.records[-1].update(tokens=self._count, sha256=self._digest.hexdigest())

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; returns [{file, tokens, sha256}, ...] in order."""
        if self._handle is not None:
            self._finish_shard()
        return self.records

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _tokenize(cfg: DataConfig, tokenizer: Tokenizer, eos_id: int, directory: Path,
              documents: Iterator[str], total: int | None, progress: bool) -> dict[str, Any]:
    """Write the train and val shards of `documents` into `directory`; returns statistics for meta.json."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    writers = {split: _ShardWriter(directory, split, dtype, cfg.shard_tokens) for split in ("train", "val")}
    counts = np.zeros(vocab_size, dtype=np.int64)  # unigram counts of the training tokens
    n_documents = {"train": 0, "val": 0}
    n_tokens = 0
    corpus_digest = hashlib.sha256()  # equals documents_sha256() of the documents actually tokenized
    index = 0
    bar = tqdm(total=total, unit="doc", desc=f"tokenizing {cfg.name}", disable=not progress)
    try:
        while cfg.max_tokens is None or n_tokens < cfg.max_tokens:
            chunk = list(itertools.islice(documents, _ENCODE_CHUNK_DOCUMENTS))
            if not chunk:
                break
            ids = {"train": [], "val": []}
            for text, token_ids in zip(chunk, _encode_chunk(tokenizer, chunk), strict=True):
                split = "val" if is_validation_document(index, text, cfg.val_fraction, cfg.seed) else "train"
                ids[split].extend(token_ids)
                ids[split].append(eos_id)
                n_documents[split] += 1
                n_tokens += len(token_ids) + 1
                corpus_digest.update(text.encode("utf-8") + b"\0")
                index += 1
                if cfg.max_tokens is not None and n_tokens >= cfg.max_tokens:
                    break
            bar.update(len(chunk))
            for split, split_ids in ids.items():
                array = np.asarray(split_ids, dtype=np.int64)
                writers[split].write(array)
                if split == "train":
                    counts += np.bincount(array, minlength=vocab_size)
        shards = {split: writer.close() for split, writer in writers.items()}
    finally:
        bar.close()
        for writer in writers.values():
            writer.abort()
    if n_documents["train"] == 0:
        raise ValueError(f"no training documents: {index} document(s) read, val_fraction={cfg.val_fraction}")
    if n_documents["val"] == 0 and cfg.val_fraction > 0:
        raise ValueError(f"validation split is empty: none of {index} document(s) fell under "
                         f"val_fraction={cfg.val_fraction}; raise val_fraction or add documents")
    probabilities = counts[counts > 0] / counts.sum()
    entropy_nats = float(-(probabilities * np.log(probabilities)).sum())
    return {"vocab_size": vocab_size, "dtype": dtype.name, "shards": shards, "documents": n_documents,
            "tokens": {split: sum(r["tokens"] for r in records) for split, records in shards.items()},
            "documents_sha256": corpus_digest.hexdigest(),
            "unigram_entropy": {"nats": entropy_nats, "bits": entropy_nats / math.log(2)}}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _publish(staging: Path, directory: Path) -> None:
    """Move the finished `staging` folder to `directory`; an existing `directory` is renamed away first and
    deleted only once the new one is in place, so a crash in between leaves one complete copy on disk."""
    retired = None
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(directory, retired)
    os.replace(staging, directory)
    if retired is not None:
        shutil.rmtree(retired)


def prepare_data(cfg: DataConfig, force: bool = False, progress: bool = True) -> PreparedData:
    """Tokenize the configured corpus into `dataset_dir(cfg)` unless it is already there; return it loaded.

    An existing data set with the same hash is verified (`load_prepared`, verify="auto") and returned without
    re-tokenizing; one that fails verification raises (pass force=True to rebuild). Everything is written into
    a temporary folder beside it, meta.json last, then moved into place: an interrupted prepare leaves any
    earlier data set intact and no meta.json, so the next run rebuilds. Run it on one process only (rank 0).
    """
    cfg.validate()
    directory = dataset_dir(cfg)
    if not force and (directory / META_FILE).is_file():
        return dataclasses.replace(load_prepared(cfg, verify="auto"), reused=True)
    documents, total, description = _documents(cfg)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden sibling (mkdir honours the umask, unlike mkdtemp's 0700), renamed into place at the end.
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        tokenizer = _make_tokenizer(cfg, documents)
        eos_id = tokenizer.token_to_id(cfg.eos_token)
        if eos_id is None:
            raise ValueError(f"eos_token {cfg.eos_token!r} is not in the vocabulary of tokenizer "
                             f"{cfg.tokenizer!r}; set data.eos_token to its end-of-text token")
        tokenizer.save(str(staging / TOKENIZER_FILE))
        stats = _tokenize(cfg, tokenizer, eos_id, staging, documents(), total, progress)
        meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(cfg),
                "config_hash": config_hash(cfg), "inputs": input_fingerprint(cfg), "eos_id": eos_id,
                "corpus": {"description": description, "sha256": stats.pop("documents_sha256"),
                           "python_version": sys.version},
                "tokenizer_file": TOKENIZER_FILE, "created_at": datetime.now(timezone.utc).isoformat(),
                **stats}
        _write_json(staging / META_FILE, meta)
        _publish(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only our own half-written copy; the error propagates
        raise
    return load_prepared(directory, verify="size")  # just hashed while writing


class TokenStream:
    """Read-only 1-D sequence of token ids over consecutive shard arrays, sliceable across shard boundaries.

    `stream[a:b]` returns a numpy array of the shard dtype (a view when it lies in one shard, else a copy);
    `stream[i]` returns an int. Only unit-step slices are supported.
    """

    def __init__(self, shards: Sequence[np.ndarray], dtype: np.dtype | str | None = None) -> None:
        self.shards = [shard for shard in shards if len(shard) > 0]
        self._starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        self.dtype = np.dtype(dtype) if dtype is not None else (
            self.shards[0].dtype if self.shards else np.dtype("<u2"))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, key: int | slice) -> np.ndarray | int:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError(f"TokenStream supports unit-step slices only, got step {step}")
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            first = int(np.searchsorted(self._starts, start, side="right")) - 1
            pieces = []
            while start < stop:
                offset = start - int(self._starts[first])
                piece = self.shards[first][offset:offset + stop - start]
                pieces.append(piece)
                start += len(piece)
                first += 1
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        index = int(key) + len(self) if int(key) < 0 else int(key)
        if not 0 <= index < len(self):
            raise IndexError(f"token index {key} out of range for a stream of {len(self)} tokens")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return int(self.shards[shard][index - int(self._starts[shard])])


@dataclass(frozen=True)
class PreparedData:
    """A loaded data set: its folder, meta.json as a dict, and the token streams (np.memmap, read-only)."""

    directory: Path
    meta: dict[str, Any]
    train_tokens: TokenStream
    val_tokens: TokenStream
    reused: bool = False  # True when prepare_data found it already prepared

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / self.meta["tokenizer_file"]

    @property
    def unigram_entropy_nats(self) -> float:
        """Entropy of the training tokens' unigram distribution (nats/token): the loss of a model that learned
        token frequencies only; a trained model must go below it."""
        return float(self.meta["unigram_entropy"]["nats"])

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))


def load_prepared(source: DataConfig | str | os.PathLike[str], verify: str = "auto") -> PreparedData:
    """Open a prepared data set (a DataConfig, or its folder) after checking it; nothing is re-tokenized.

    Checks: meta.json exists with the known format version (and, from a DataConfig, the expected hash); the
    vocabulary fits the shard dtype and matches the tokenizer file; every shard exists with exactly
    tokens x itemsize bytes; and with verify="full" (or "auto" below FULL_VERIFY_MAX_BYTES) its sha256.
    Raises FileNotFoundError / ValueError naming the file and what was expected.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r} is not one of {list(VERIFY_MODES)}")
    expected_hash = None
    if isinstance(source, DataConfig):
        directory, expected_hash = dataset_dir(source), config_hash(source)
    else:
        directory = Path(source)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no prepared data set at {str(directory)!r} ({META_FILE} missing): run "
                                "bitlaw-prepare (or prepare_data) with this data config first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path} is not valid JSON ({error}); rebuild with force=True") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta.get('format_version')!r}; this code reads "
                         f"format_version {FORMAT_VERSION}: rebuild with bitlaw-prepare force=true")
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}: rebuild with bitlaw-prepare force=true")
    if expected_hash is not None and meta.get("config_hash") != expected_hash:
        raise ValueError(f"{meta_path} has config_hash {meta.get('config_hash')!r}, "
                         f"expected {expected_hash!r}")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(f"{meta_path}: dtype {meta.get('dtype')!r} is not one of ['uint16', 'uint32']")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if not 1 <= int(meta["vocab_size"]) <= np.iinfo(dtype).max + 1:
        raise ValueError(f"{meta_path}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']} "
                         f"(at most {np.iinfo(dtype).max + 1} ids)")
    tokenizer_path = directory / meta["tokenizer_file"]
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(tokenizer_path)!r} listed in {meta_path} is missing")
    tokenizer_vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)
    if tokenizer_vocab != int(meta["vocab_size"]):
        raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer_vocab} ids but {meta_path} says "
                         f"vocab_size {meta['vocab_size']} (dtype {meta['dtype']})")
    records = [record for split in ("train", "val") for record in meta["shards"][split]]
    total_bytes = sum(int(record["tokens"]) * dtype.itemsize for record in records)
    full = verify == "full" or (verify == "auto" and total_bytes < FULL_VERIFY_MAX_BYTES)
    for record in records:
        path, expected = directory / record["file"], int(record["tokens"]) * dtype.itemsize
        if not path.is_file():
            raise FileNotFoundError(f"shard {str(path)!r} listed in {meta_path} is missing")
        actual = path.stat().st_size
        if actual != expected:
            raise ValueError(f"shard {str(path)!r} has {actual} bytes, expected {expected} "
                             f"({record['tokens']} tokens x {dtype.itemsize} bytes): truncated or replaced")
        if full and _sha256_file(path) != record["sha256"]:
            raise ValueError(f"shard {str(path)!r} is corrupt: sha256 {_sha256_file(path)} differs from "
                             f"{record['sha256']} in {meta_path}")

    def stream(split: str) -> TokenStream:
        return TokenStream([np.memmap(directory / record["file"], dtype=dtype, mode="r",
                                      shape=(int(record["tokens"]),))
                            for record in meta["shards"][split] if int(record["tokens"]) > 0], dtype=dtype)

    return PreparedData(directory=directory, meta=meta, train_tokens=stream("train"),
                        val_tokens=stream("val"))


class WindowSampler:
    """Deterministic training batches: non-overlapping windows of seq_len + 1 tokens in a seeded order.

    Window i covers tokens [i * seq_len, i * seq_len + seq_len] (n_windows = (len(tokens) - 1) // seq_len).
    Epoch e visits every window once, in the order of a permutation drawn from PCG64([seed, e]); the epochs'
    orders are concatenated and optimizer step s takes positions [s * G, (s + 1) * G), G = global_batch
    (sequences per step across all ranks). Rank r of world_size W gets positions [r * G / W, (r + 1) * G / W)
    of its step. So a batch is a pure function of (seed, step, rank, world_size): resuming at step k replays
    what an uninterrupted run saw, ranks never overlap within a step and together form the one-process batch.
    """

    def __init__(self, tokens: Sequence[int] | np.ndarray | TokenStream, seq_len: int, global_batch: int,
                 seed: int) -> None:
        if seq_len < 1 or global_batch < 1 or seed < 0:
            raise ValueError(f"need seq_len >= 1, global_batch >= 1, seed >= 0; got seq_len={seq_len}, "
                             f"global_batch={global_batch}, seed={seed}")
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.n_windows = max(len(tokens) - 1, 0) // seq_len
        if self.n_windows < global_batch:
            raise ValueError(f"{len(tokens)} tokens give {self.n_windows} windows of seq_len={seq_len} + 1, "
                             f"fewer than global_batch={global_batch}: use more data or a smaller batch")
        self._permutations: dict[int, np.ndarray] = {}  # at most two epochs: a step can straddle a boundary

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of `epoch` (int64 [n_windows]), cached for the current and next epoch."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            generator = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._permutations[epoch] = generator.permutation(self.n_windows)
        return self._permutations[epoch]

    def epoch_of(self, step: int) -> int:
        """The epoch that step `step`'s first window belongs to."""
        return step * self.global_batch // self.n_windows

    def window_indices(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Indices (int64 [global_batch / world_size]) of the windows rank `rank` trains on at `step`."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        if world_size < 1 or self.global_batch % world_size != 0:
            raise ValueError(f"global_batch={self.global_batch} is not divisible by world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        per_rank = self.global_batch // world_size
        positions = step * self.global_batch + rank * per_rank + np.arange(per_rank, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.n_windows)
        windows = [self.permutation(int(e))[offset] for e, offset in zip(epochs, offsets, strict=True)]
        return np.array(windows, dtype=np.int64)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for rank `rank` at `step`: int64 tensors [global_batch / world_size, seq_len], y[:, t] is
        the token after x[:, t]."""
        return _windows_to_batch(self.tokens, self.window_indices(step, rank, world_size), self.seq_len)


def _windows_to_batch(tokens: Sequence[int] | np.ndarray | TokenStream, windows: np.ndarray,
                      seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[int(w) * seq_len:int(w) * seq_len + seq_len + 1], dtype=np.int64)
                     for w in windows])
    sequences = torch.from_numpy(rows)
    return sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()


def val_batches(tokens: Sequence[int] | np.ndarray | TokenStream, seq_len: int, batch_size: int,
                max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation stream's first windows, in order, as (x, y) int64 [<= batch_size, seq_len] batches.

    Windows as in WindowSampler (window i starts at i * seq_len), no randomness; the last batch may be
    smaller; at most `max_batches` batches (None: all windows).
    """
    if seq_len < 1 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"need seq_len >= 1, batch_size >= 1, max_batches >= 1 or None; got {seq_len}, "
                         f"{batch_size}, {max_batches}")
    n_windows = max(len(tokens) - 1, 0) // seq_len
    if n_windows == 0:
        raise ValueError(f"validation stream of {len(tokens)} tokens has no window of seq_len={seq_len} + 1")
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    return [_windows_to_batch(tokens, np.arange(first, min(first + batch_size, n_windows)), seq_len)
            for first in range(0, n_windows, batch_size)]
