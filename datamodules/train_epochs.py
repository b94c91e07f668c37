"""One worker's training batches of one epoch, as an explicit list of WebDataset stages whose seeds
name the epoch and the worker (``resumable.py`` explains why).

``sampling="permutation"`` (the default): the worker's share of the epoch's permutation
(``epoch_plan.py``), read sample by sample through the byte-range index (``sample_index.py``), from
the first sample of its first unconsumed batch (a resumed epoch reads nothing it already trained on).
``sampling="resampled"``: an endless stream, as WebDataset's examples train: shards drawn with
replacement per worker, tar members, a shuffle buffer, and a skip of the samples of consumed batches
before decoding. Then, for both: decode, the per-sample transform, batching (plain or by cost), the
worker's batch count, and the tags the main process reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import webdataset as wds

from .batching import collate
from .bucketing import BucketBatches, TagPadding
from .epoch_plan import EpochPlan, PlannedSamples
from .sample_index import SampleReader
from .shards import KeyedStage, SkipCounter, decode_sample

Sampling = Literal["permutation", "resampled"]


def stream_seed(seed: int, rank: int, worker: int, epoch: int) -> int:
    """Seed of one (rank, worker, epoch) stream; distinct and stable across processes."""
    return (seed * 1_000_003 + rank) * 1_000_003 * 1_000_003 + worker * 1_000_003 + epoch


class FixedSeed:
    """``ResampledShards``' worker seed (a callable, picklable for DataLoader workers)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self) -> int:
        return self.seed


class SkipSamples:
    """Drop the first ``n`` raw samples: the batches a resumed epoch already trained on."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return islice(src, self.n, None)


class TakeBatches:
    """Stop after ``n`` batches: the worker's share of the epoch (equal on every rank)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return islice(src, self.n)


@dataclass
class TrainEpochs:
    """The ``EpochBatches`` of a ``ShardDataModule``'s training split.

    ``example`` builds one training example from a decoded sample and takes the epoch (its random
    text choice is keyed by seed, epoch and sample); ``tag`` attaches the worker's skip count.
    ``reader`` (permutation sampling) reads samples by number; ``world`` and ``workers`` are the
    ranks and the DataLoader workers per rank the epoch is dealt to. ``batches_per_worker`` is the
    most any worker runs (resampled: every worker runs exactly that many).
    """

    urls: list[str]
    example: Any
    batch_size: int
    batches_per_worker: int
    shuffle_buffer: int
    bucket_batches: int
    seed: int
    rank: int
    counter: SkipCounter
    tag: Callable[[dict[str, Any]], dict[str, Any]]
    sampling: Sampling = "permutation"
    reader: SampleReader | None = None
    world: int = 1
    workers: int = 1

    def plan(self, epoch: int) -> EpochPlan:
        if self.reader is None:
            raise ValueError("permutation sampling needs the split's sample index (reader)")
        return EpochPlan(len(self.reader.index), self.batch_size, self.world, self.seed, epoch)

    def stages(self, epoch: int, worker: int, done: int) -> list[Any]:
        seed = stream_seed(self.seed, self.rank, worker, epoch)
        per_buffer = self.bucket_batches or 1
        whole = done // per_buffer * per_buffer  # batches skippable before decoding (whole buffers)
        if self.sampling == "permutation":
            planned = self.plan(epoch).worker_batches(self.rank, worker, self.workers)
            owed = len(planned)
            skip = whole * self.batch_size
            source: list[Any] = [PlannedSamples(self.reader, planned.reshape(-1), skip, self.counter)]
        else:
            owed = self.batches_per_worker
            source = [wds.ResampledShards(self.urls, deterministic=True, worker_seed=FixedSeed(seed)),
                      wds.tarfile_to_samples(handler=self.counter),
                      wds.detshuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 4, seed=seed),
                      SkipSamples(whole * self.batch_size)]
        if self.bucket_batches:
            batching: Any = BucketBatches(self.batch_size, self.bucket_batches, owed - whole, seed=seed,
                                          rank=self.rank, first_buffer=whole // per_buffer, skip=done - whole)
        else:
            batching = wds.batched(self.batch_size, collation_fn=collate, partial=False)
        return [
            *source,
            wds.map(decode_sample, handler=self.counter),
            wds.map(KeyedStage(self.example.for_epoch(epoch)), handler=self.counter),
            batching,
            TakeBatches(owed - done),
            wds.map(TagPadding()),
            wds.map(self.tag),
        ]

    def batches(self, epoch: int, worker: int, done: int) -> Iterator[dict[str, Any]]:
        return iter(wds.DataPipeline(*self.stages(epoch, worker, done)))
