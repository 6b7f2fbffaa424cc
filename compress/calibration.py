"""Calibration windows for post-training compression, drawn from the training split of a prepared data set.

The training split is cut into non-overlapping windows of ``length`` tokens (window ``i`` starts at token
``i · length``) and a seeded permutation of them is dealt out in order: first the calibration set (Hessians of
GPTQ/SparseGPT, Block Influence, PV-tuning's training batches), then PV-tuning's validation set, so the two never
share a token. The validation split of the data set is never read here: it is what the compressed model is
evaluated on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data.windows import TokenStream


@dataclass(frozen=True)
class Calibration:
    """calibration: int64 ``[sequences, length]``; selection: int64 ``[selection_sequences, length]`` (PV-tuning's
    choice of the best step; 0 rows when not asked); windows: whole windows the training split holds."""

    calibration: torch.Tensor
    selection: torch.Tensor
    windows: int


def draw(tokens: TokenStream | Sequence[int] | np.ndarray, sequences: int, length: int, seed: int,
         selection_sequences: int = 0) -> Calibration:
    """Deal ``sequences`` calibration windows, then ``selection_sequences`` selection windows, of ``length`` tokens
    from ``tokens`` (the training split) by a permutation seeded with ``seed``.

    ValueError, naming the numbers, when a count is not a positive int (``selection_sequences`` may be 0) or when
    the split holds fewer whole windows than asked for.
    """
    for name, value, low in (("sequences", sequences, 1), ("length", length, 1),
                             ("selection_sequences", selection_sequences, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"calibration {name}={value!r} is not allowed; allowed: an integer >= {low}")
    windows = len(tokens) // length
    wanted = sequences + selection_sequences
    if windows < wanted:
        extra = f" + {selection_sequences} for PV-tuning's step selection" if selection_sequences else ""
        raise ValueError(f"the training split holds {len(tokens):,} tokens = {windows} windows of length {length}; "
                         f"asked for {sequences} calibration sequences{extra} = {wanted}: lower calibration.sequences "
                         "or calibration.length, or use more data")
    order = np.random.default_rng(seed).permutation(windows)[:wanted]
    rows = np.stack([np.asarray(tokens[int(i) * length:(int(i) + 1) * length], dtype=np.int64) for i in order])
    data = torch.from_numpy(rows)
    return Calibration(data[:sequences], data[sequences:], windows)
