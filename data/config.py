"""What to tokenize and how: the ``data`` config of every bitlaw command, validated before anything is read."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import resolve_files

SOURCES = ("embedded", "files", "hub")


@dataclass
class DataConfig:
    """What to tokenize and how; every field except `name` and `cache_dir` is part of the data set's hash.

    name: prefix of the data set folder (letters, digits, `.`, `_`, `-`).
    source: "embedded" (CPython docs, offline), "files" (local `paths`) or "hub" (streamed, network).
    paths: for source="files": `.txt` files (one document each), `.jsonl` / `.parquet` files (one document per
        row, column `text_field`) or folders of them, all UTF-8 text. Relative paths resolve against the current
        directory.
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
    cache_dir: folder holding prepared data sets; it must be writable unless the data set is already prepared there.
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
