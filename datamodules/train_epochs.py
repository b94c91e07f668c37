"""One worker's training batches of one epoch, as an explicit list of WebDataset stages whose seeds
name the epoch and the worker (``resumable.py`` explains why): resampled shards, tar members,
deterministic shuffle, a skip of the samples of already-consumed batches (before decoding), decode,
the per-sample transform, batching (plain or by cost), and the tags the main process reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import webdataset as wds

from .batching import collate
from .bucketing import BucketBatches, TagPadding
from .shards import SkipCounter, decode_sample


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

    def stages(self, epoch: int, worker: int, done: int) -> list[Any]:
        seed = stream_seed(self.seed, self.rank, worker, epoch)
        per_buffer = self.bucket_batches or 1
        whole = done // per_buffer * per_buffer  # batches skippable before decoding (whole buffers)
        if self.bucket_batches:
            batching: Any = BucketBatches(self.batch_size, self.bucket_batches, self.batches_per_worker - whole,
                                          seed=seed, rank=self.rank, first_buffer=whole // per_buffer,
                                          skip=done - whole)
        else:
            batching = wds.batched(self.batch_size, collation_fn=collate, partial=False)
        return [
            wds.ResampledShards(self.urls, deterministic=True, worker_seed=FixedSeed(seed)),
            wds.tarfile_to_samples(handler=self.counter),
            wds.detshuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 4, seed=seed),
            SkipSamples(whole * self.batch_size),
            wds.map(decode_sample, handler=self.counter),
            wds.map(self.example.for_epoch(epoch), handler=self.counter),
            batching,
            TakeBatches(self.batches_per_worker - done),
            wds.map(TagPadding()),
            wds.map(self.tag),
        ]

    def batches(self, epoch: int, worker: int, done: int) -> Iterator[dict[str, Any]]:
        return iter(wds.DataPipeline(*self.stages(epoch, worker, done)))
