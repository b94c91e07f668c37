"""An epoch as one pass over the training triplets: a seeded permutation shared by every rank.

Every rank computes the same permutation of all ``n`` training samples from (seed, epoch), cuts it
into global batches of ``batch_size`` and deals them out: global batch ``j`` goes to rank
``j mod world``, and a rank's local batch ``i`` to DataLoader worker ``i mod workers`` (the order in
which a DataLoader takes batches from its workers, see ``resumable.py``). So every triplet is in
exactly one batch of one rank, every rank runs ``n // (batch_size × world)`` steps, and a batch is a
uniform draw from the whole split, not a window of neighbouring records.

The remainder, ``n mod (batch_size × world)`` samples, cannot fill an equal batch on every rank and is
left out of that epoch; which samples it holds changes with the permutation, so over epochs none is
left out for good. A worker whose stream loses a sample to corruption (skipped and counted) fills its
last batch from the start of its own list again, so the step count stays equal on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .sample_index import SampleReader


@dataclass(frozen=True)
class EpochPlan:
    """The deal of one epoch; ``n`` samples, ``batch_size`` per step, ``world`` ranks."""

    n: int
    batch_size: int
    world: int
    seed: int
    epoch: int

    @property
    def batches_per_rank(self) -> int:
        return self.n // (self.batch_size * self.world)

    @property
    def remainder(self) -> int:
        """Samples left out of this epoch: they cannot fill an equal batch on every rank."""
        return self.n - self.batches_per_rank * self.batch_size * self.world

    def permutation(self) -> np.ndarray:
        # PCG64 seeded by the pair: the same permutation in every process and on every platform.
        return np.random.Generator(np.random.PCG64([self.seed, self.epoch])).permutation(self.n)

    def rank_batches(self, rank: int) -> np.ndarray:
        """``[batches_per_rank, batch_size]`` sample numbers of one rank's batches, in step order."""
        used = self.permutation()[: self.n - self.remainder]
        return used.reshape(-1, self.world, self.batch_size)[:, rank]

    def worker_batches(self, rank: int, worker: int, workers: int) -> np.ndarray:
        """The batches of one DataLoader worker: the rank's batches ``worker``, ``worker + workers``, ..."""
        return self.rank_batches(rank)[worker::workers]

    def left_out(self) -> np.ndarray:
        return self.permutation()[self.n - self.remainder:]


class PlannedSamples:
    """First pipeline stage of a worker: its planned samples from number ``skip`` on, read through the
    sample index, then (if the pipeline asks for more, because corrupt samples were dropped) the same
    list once more from its start. The pipeline's ``TakeBatches`` stops it at the worker's batch count.
    (A stream that runs short even so has lost more samples than any skip budget allows.) A sample
    whose bytes cannot be split into tar members goes to ``handler``, as WebDataset's tar reader
    hands it its errors: skipped when it returns True, else raised."""

    def __init__(self, reader: SampleReader, samples: np.ndarray, skip: int,
                 handler: Callable[[Exception], bool] | None = None) -> None:
        self.reader, self.samples, self.skip, self.handler = reader, samples, skip, handler

    def __call__(self) -> Iterator[dict[str, Any]]:
        # A callable, not an iterable: the form WebDataset's ``DataPipeline`` takes as a source.
        for i in (*self.samples[self.skip:], *self.samples):
            try:
                sample = self.reader(int(i))
            except Exception as exn:
                if self.handler is not None and self.handler(exn):
                    continue
                raise
            yield sample
