"""`bitlaw-prepare` (also `python -m bitlaw.data.cli`): tokenize the configured corpus into token shards once.

    bitlaw-prepare                                   # the embedded corpus, BPE 4096, into ./data_cache
    bitlaw-prepare data=files 'data.paths=[a.jsonl]' data.cache_dir=/scratch/data_cache
    bitlaw-prepare data=c4 force=true                # network: streams C4, rebuilds

Prints the data set folder, train/val token counts, vocabulary size and the unigram entropy of the training
tokens. Running it again with the same config reuses the verified data set. Bad input (a config value, a data
file, an unreachable hub data set or tokenizer, a read-only cache folder) ends with one line
`bitlaw-prepare: <message>` and exit status 2, before anything is written; any other error keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..core.config import CONF_DIR
from .config import DataConfig
from .shards import PreparedData, prepare_data

PROG = "bitlaw-prepare"


def to_data_config(node: DictConfig | dict[str, Any]) -> DataConfig:
    """The `data` config node as a validated DataConfig; unknown keys or wrong types raise ValueError naming
    the key (OmegaConf structured merge), before anything is read."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), node)
        data_cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        # The message keeps everything OmegaConf said; dropping its internal frames keeps the output readable.
        key = getattr(error, "full_key", None)
        raise ValueError(f"invalid data config{f' at data.{key}' if key else ''}: "
                         f"{str(error).splitlines()[0]}; the fields of DataConfig are "
                         f"{[f.name for f in dataclasses.fields(DataConfig)]}") from None
    assert isinstance(data_cfg, DataConfig)
    return data_cfg


def resolved_data_config(node: DictConfig | dict[str, Any]) -> DataConfig:
    """:func:`to_data_config` with the paths the user gave (cache folder, data files, a tokenizer file) made
    absolute against the directory the command started in."""
    data_cfg = to_data_config(node)
    data_cfg.cache_dir = _absolute(data_cfg.cache_dir)
    data_cfg.paths = [_absolute(path) for path in data_cfg.paths]
    if data_cfg.tokenizer.endswith(".json"):
        data_cfg.tokenizer = _absolute(data_cfg.tokenizer)
    return data_cfg


def _absolute(path: str) -> str:
    # Hydra may change the working directory; paths on the command line mean the directory we started in.
    return path if os.path.isabs(path) else to_absolute_path(path)


def summary(prepared: PreparedData) -> str:
    """A few lines describing a prepared data set, for people."""
    meta = prepared.meta
    state = "reused (verified)" if prepared.reused else "built"
    return "\n".join([
        f"data set: {prepared.directory} [{state}]",
        f"corpus: {meta['corpus']['description']}",
        f"train tokens: {meta['tokens']['train']:,} in {len(meta['shards']['train'])} shard(s), "
        f"{meta['documents']['train']:,} documents",
        f"val tokens: {meta['tokens']['val']:,} in {len(meta['shards']['val'])} shard(s), "
        f"{meta['documents']['val']:,} documents",
        f"vocab size: {prepared.vocab_size:,} (eos id {prepared.eos_id}, {meta['dtype']})",
        f"unigram entropy: {prepared.unigram_entropy_nats:.4f} nats/token "
        f"({meta['unigram_entropy']['bits']:.4f} bits)",
    ])


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="prepare")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: compose conf/prepare.yaml, prepare the data set, print its summary; bad input (the
    ValueError / FileNotFoundError of `to_data_config` and `prepare_data`) exits 2 with one line."""
    try:
        data_cfg = resolved_data_config(cfg.data)
        prepared = prepare_data(data_cfg, force=bool(cfg.force), progress=bool(cfg.progress))
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary(prepared))


if __name__ == "__main__":
    main()
