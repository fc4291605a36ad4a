"""Batch samplers of the trainer: which records form each global batch, a pure function of
``(seed, epoch)`` (so a resumed run sees the same batches).

* :class:`EpochBatchSampler`: batches of a random permutation.
* :class:`LengthGroupedBatchSampler`: LLaVA's ``group_by_modality_length`` idea: the
  permutation is cut into mega-batches of ``batch_size x mega`` records, each sorted by length,
  so a batch holds records of similar length and pads little; the mega-batch holding the
  longest record goes first (out-of-memory shows at the first step, not hours in). Lengths are
  the records' byte lengths (:attr:`moe_vision.data.llava.LlavaDataset.lengths`, free from the
  index), a proxy of their token lengths. On with ``TrainOptions.group_by_length``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


class EpochBatchSampler:
    """Batches of a permutation that depends only on ``(seed, epoch)``.

    Yields *global* batches of ``batch_size`` indices; ``accelerator.prepare`` hands batch
    ``k`` to process ``k % num_processes``. Set :attr:`epoch` before iterating (it is not
    named ``set_epoch`` on purpose: accelerate's loader would overwrite it with its own
    iteration counter, which a resumed run does not share).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("EpochBatchSampler needs at least one sample")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        for i in range(0, self.num_samples, self.batch_size):
            yield order[i : i + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)


class LengthGroupedBatchSampler(EpochBatchSampler):
    """Batches of records of similar length (module docstring).

    Args:
        lengths: ``(N,)`` length proxy of every record.
        batch_size: records per global batch.
        seed: the permutation's seed (with :attr:`epoch`).
        mega: batches per mega-batch (LLaVA uses 50).
    """

    def __init__(
        self, lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, mega: int = 50
    ) -> None:
        super().__init__(len(lengths), batch_size, seed)
        if mega < 1:
            raise ValueError(f"mega must be >= 1, got {mega}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.mega = int(mega)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).numpy()
        size = self.batch_size * self.mega
        megas = [order[i : i + size] for i in range(0, self.num_samples, size)]
        megas = [m[np.argsort(-self.lengths[m], kind="stable")] for m in megas]
        longest = max(range(len(megas)), key=lambda k: self.lengths[megas[k][0]])
        megas[0], megas[longest] = megas[longest], megas[0]
        for m in megas:
            for i in range(0, len(m), self.batch_size):
                yield m[i : i + self.batch_size].tolist()


def batch_sampler(
    num_samples: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None
) -> EpochBatchSampler:
    """The trainer's sampler: length-grouped when ``lengths`` is given, else a permutation."""
    if lengths is None:
        return EpochBatchSampler(num_samples, batch_size, seed)
    return LengthGroupedBatchSampler(lengths, batch_size, seed)
