"""Token data for pretraining: tokenize a corpus once into verified token shards, load them, draw windows.

Layout of a prepared data set, `<cache_dir>/<name>-<hash 12 hex>/`: `tokenizer.json`, `train_000.bin`, ...,
`val_000.bin`, ... (raw little-endian uint16 token ids when the vocabulary has at most 65536 ids, else
uint32; documents end with the EOS id) and `meta.json`, written last. The hash covers every config field that
changes the tokens plus a fingerprint of the inputs (Python version for the embedded corpus, size and mtime of
local files, sha256 of a tokenizer file). Hydra-free: the CLI in `train/prepare.py` resolves paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
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
from train.windows import TokenStream, WindowSampler, val_batches

__all__ = ["DataConfig", "PreparedData", "TokenStream", "WindowSampler", "config_hash", "dataset_dir",
           "is_validation_document", "load_prepared", "prepare_data", "val_batches"]
