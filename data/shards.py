"""Token shards: tokenize a corpus once into verified shard files, and load them back.

A prepared data set lives in `<cache_dir>/<name>-<hash 12 hex>/`: `tokenizer.json`, `train_000.bin`, ...,
`val_000.bin`, ... (raw little-endian uint16 token ids when the vocabulary has at most 65536 ids, else
uint32; every document is followed by the EOS id) and `meta.json`, written last. The hash covers every config
field that changes the tokens plus a fingerprint of the inputs (Python version for the embedded corpus, size
and mtime of local files, sha256 of a tokenizer file). Hydra-free: the CLI (:mod:`bitlaw.data.cli`) resolves paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .config import DataConfig
from .corpus import (
    build_embedded_corpus,
    hub_fetch_error,
    iter_file_documents,
    iter_hub_documents,
    resolve_files,
)
from .windows import TokenStream

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
VERIFY_MODES = ("auto", "full", "size")
FULL_VERIFY_MAX_BYTES = 1 << 30
"""verify="auto" hashes every shard when the data set is smaller than this (1 GiB), else checks sizes only."""
_ENCODE_CHUNK_DOCUMENTS = 256
_NAMED_FILES = 10  # files named in a corpus description; more are counted
_NOT_HASHED = ("name", "cache_dir")  # where the data set lives, not what is in it
_META_KEYS = ("config_hash", "vocab_size", "eos_id", "dtype", "shards", "tokens", "tokenizer_file",
              "unigram_entropy")


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 8 MiB blocks."""
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
        fingerprint["tokenizer_sha256"] = sha256_file(Path(cfg.tokenizer))
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
        names = ", ".join(str(path) for path in files[:_NAMED_FILES]) + (", ..." if len(files) > _NAMED_FILES else "")

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
    try:
        return Tokenizer.from_pretrained(cfg.tokenizer)
    except OSError as error:  # huggingface_hub's network, offline-mode and not-found errors are all OSErrors
        raise hub_fetch_error(f"hub tokenizer data.tokenizer={cfg.tokenizer!r}", error,
                              "data.tokenizer=path/to/tokenizer.json") from None


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
    # disable=None: a bar on a terminal only; in a log its carriage-return updates would be a screenful of lines.
    bar = tqdm(total=total, unit="doc", desc=f"tokenizing {cfg.name}", disable=None if progress else True)
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


def _check_writable(cache_dir: Path) -> list[Path]:
    """Raise ValueError naming `cache_dir` unless this process can create it or write into it; nothing is created.

    Returns the folders of `cache_dir` that do not exist yet (itself and missing parents), deepest first.
    """
    missing: list[Path] = []
    existing = cache_dir.absolute()
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"data.cache_dir={str(cache_dir)!r}: {str(existing)!r} is a file, not a folder")
    # access() also answers False on a read-only file system, for root too.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"data.cache_dir={str(cache_dir)!r} is not writable: {str(existing)!r} is read-only for "
                         "this user; set data.cache_dir to a writable folder")
    return missing


def prepare_data(cfg: DataConfig, force: bool = False, progress: bool = True) -> PreparedData:
    """Tokenize the configured corpus into `dataset_dir(cfg)` unless it is already there; return it loaded.

    An existing data set with the same hash is verified (`load_prepared`, verify="auto") and returned without
    re-tokenizing, also from a read-only cache_dir; one that fails verification raises (pass force=True to
    rebuild). Otherwise, before anything is written: the config is validated, cache_dir must be writable, the
    input must hold a document with text, a hub data set or tokenizer must be reachable, and a trained BPE
    reads every document (so a bad data file fails here). Bad input raises ValueError / FileNotFoundError
    naming it. Everything is then written into a temporary folder beside the data set, meta.json last, and
    moved into place: an error or interruption (e.g. a bad line found while tokenizing with a pretrained
    tokenizer) leaves any earlier data set intact, removes the temporary folder and the cache folders this call
    created, and leaves no meta.json, so the next run rebuilds. Run it on one process only (rank 0).
    """
    cfg.validate()
    directory = dataset_dir(cfg)
    if not force and (directory / META_FILE).is_file():
        return dataclasses.replace(load_prepared(cfg, verify="auto"), reused=True)
    new_folders = _check_writable(Path(cfg.cache_dir))
    documents, total, description = _documents(cfg)
    if not any(text.strip() for text in documents()):  # stops at the first document with text
        within = "" if cfg.max_documents is None else f" (the first data.max_documents={cfg.max_documents})"
        raise ValueError(f"the input has no documents with text ({description}): every document{within} is "
                         "empty or blank")
    tokenizer = _make_tokenizer(cfg, documents)
    eos_id = tokenizer.token_to_id(cfg.eos_token)
    if eos_id is None:
        raise ValueError(f"eos_token {cfg.eos_token!r} is not in the vocabulary of tokenizer "
                         f"{cfg.tokenizer!r}; set data.eos_token to its end-of-text token")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden sibling (mkdir honours the umask, unlike mkdtemp's 0700), renamed into place at the end.
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
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
        for folder in new_folders:  # deepest first; one that another process has written into stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return load_prepared(directory, verify="size")  # just hashed while writing


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
        if full and sha256_file(path) != record["sha256"]:
            raise ValueError(f"shard {str(path)!r} is corrupt: sha256 {sha256_file(path)} differs from "
                             f"{record['sha256']} in {meta_path}")

    def stream(split: str) -> TokenStream:
        return TokenStream([np.memmap(directory / record["file"], dtype=dtype, mode="r",
                                      shape=(int(record["tokens"]),))
                            for record in meta["shards"][split] if int(record["tokens"]) > 0], dtype=dtype)

    return PreparedData(directory=directory, meta=meta, train_tokens=stream("train"),
                        val_tokens=stream("val"))
