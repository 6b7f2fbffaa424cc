"""Test-session setup: Triton kernels in the CPU interpreter when no CUDA device is present; shared fixtures.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here, before any test module
imports ``bitlaw.kernels.triton``. An existing value is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A deterministic text corpus of ~60k words in 400 .jsonl rows (documents)."""
    from tests.helpers import markov_corpus

    return markov_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
