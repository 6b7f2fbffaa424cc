"""LightningDataModule over prepared token shards: deterministic batches keyed by (seed, step, rank)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.shards import PreparedData
from ..data.windows import WindowSampler, val_batches


class StepBatches(Dataset):
    """Item ``i`` is micro-batch ``i % accumulate`` of optimizer step ``i // accumulate`` for one rank."""

    def __init__(self, sampler: WindowSampler, rank: int, world_size: int, accumulate: int):
        per_rank = sampler.global_batch // world_size
        if per_rank % accumulate:
            raise ValueError(f"global_batch={sampler.global_batch} over {world_size} device(s) gives {per_rank} "
                             f"sequences per device, not divisible by accumulate_grad_batches={accumulate}")
        self.sampler, self.rank, self.world_size, self.accumulate = sampler, rank, world_size, accumulate
        self.micro = per_rank // accumulate

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, part = divmod(index, self.accumulate)
        x, y = self.sampler.batch(step, self.rank, self.world_size)
        rows = slice(part * self.micro, (part + 1) * self.micro)
        return x[rows], y[rows]


class FromIndex(Sampler[int]):
    """Indices ``start, start+1, …, stop-1``: a resumed run continues at its first unseen micro-batch.

    Its length is ``stop``, the whole run's micro-batches, not the ``stop - start`` it yields: Lightning restores
    how many batches of the (single, endless) epoch were already read and ends the epoch when that count reaches
    the loader's length. With ``stop - start`` a run resumed before its midpoint would end the epoch early and start
    the loader again from ``start``, training its last steps on repeated batches.
    """

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop


class ReplayLoader(DataLoader):
    """The training loader: its position is a function of the trainer's restored ``global_step`` (see
    :class:`FromIndex`), so it resumes exactly by construction. It carries Lightning's stateful-loader protocol to say
    so: ``state_dict`` records where this attempt started, and ``load_state_dict`` has nothing to restore beyond the
    global step the checkpoint already restores."""

    def state_dict(self) -> dict[str, int]:
        return {"first_index": self.sampler.start, "stop_index": self.sampler.stop}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Nothing to restore: :meth:`TokenDataModule.train_dataloader` starts at the restored step."""


class TokenDataModule(L.LightningDataModule):
    """Training batches from :class:`WindowSampler`; validation = the first ``val_batches`` fixed windows.

    Training items are whole micro-batches (the DataLoader does not batch). The loader starts at the trainer's
    restored ``global_step``, so a resumed run reads exactly what an uninterrupted run would.
    """

    def __init__(self, data: PreparedData, seq_len: int, global_batch: int, seed: int, total_steps: int,
                 n_val_batches: int):
        super().__init__()
        self.data, self.seq_len, self.global_batch = data, seq_len, global_batch
        self.total_steps, self.n_val_batches = total_steps, n_val_batches
        self.sampler = WindowSampler(data.train_tokens, seq_len, global_batch, seed)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        dataset = StepBatches(self.sampler, trainer.global_rank, trainer.world_size, accumulate)
        order = FromIndex(trainer.global_step * accumulate, self.total_steps * accumulate)
        return ReplayLoader(dataset, sampler=order, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        batches = val_batches(self.data.val_tokens, self.seq_len, self.global_batch, self.n_val_batches)
        return DataLoader(batches, batch_size=None, num_workers=0)
