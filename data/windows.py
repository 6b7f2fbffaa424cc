"""Token streams over shard files and deterministic training windows drawn from (seed, step, rank)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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
