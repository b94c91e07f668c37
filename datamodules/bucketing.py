"""Cost-aware batching: samples of similar size share a batch, so little of each batch is padding.

Contrastive losses gather equal-sized batches across ranks, so the batch size stays fixed; only
which samples go together changes. ``BucketBatches`` holds ``bucket_batches × batch_size``
samples, orders them by cost, cuts them into batches and yields those in a seeded random order.

The order uses both costs. Source and target are padded separately (each is its own ``[B, V]``
stack, or its own sequence for Qwen), so a batch is cheap only when both are uniform: sorting by
their sum mixes (1 view, 5 views) with (5, 1) and pads both. Instead the buffer is sorted by
source cost, cut into about √(batches) groups of whole batches, and each group is sorted by target
cost ("grid" order). Replayed on the generated data's samples (buffers of 8 batches of 32,
``benchmarks/padding.py``) it pads the least of the orders tried: 1-5 views, 0.177 against 0.306
(sum), 0.239 (source only), 0.221 (source then target) and 0.362 unbucketed; Qwen3-VL-Embedding
patch counts, 0.262 against 0.326, 0.346, 0.305 and 0.524.

Costs: a tensor view is one fixed-size slot; a Qwen ``PatchedImage`` costs its patch rows
(``pixel_values.shape[0]``), and a product's cost is the sum over its views: the length of the
request the model pads to the longest in the batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, Protocol

import torch

from .batching import collate

Cost = tuple[int, int]


class Patched(Protocol):
    """A variable-size view (Qwen's ``PatchedImage``): one row of ``pixel_values`` per patch."""

    pixel_values: torch.Tensor


def views_cost(views: torch.Tensor | list[Patched] | None) -> int:
    """Slots one product takes: its views for a ``[V, 3, H, W]`` stack, its patches for a list."""
    if views is None:
        return 0
    if isinstance(views, torch.Tensor):
        return int(views.shape[0])
    return sum(int(v.pixel_values.shape[0]) for v in views)


def sample_cost(example: dict[str, Any]) -> Cost:
    """(source cost, target cost) of one transformed training example."""
    return views_cost(example.get("source_images")), views_cost(example.get("target_images"))


def grid_order(costs: list[Cost], batch_size: int) -> list[int]:
    """Indices of a buffer in bucket order (see the module docstring): consecutive runs of
    ``batch_size`` are the batches. Ties keep buffer order, so the result is deterministic."""
    n_batches = max(1, len(costs) // batch_size)
    groups = max(1, round(math.sqrt(n_batches)))
    per_group = math.ceil(n_batches / groups) * batch_size
    by_source = sorted(range(len(costs)), key=lambda i: costs[i])
    order: list[int] = []
    for start in range(0, len(by_source), per_group):
        order += sorted(by_source[start:start + per_group], key=lambda i: (costs[i][1], costs[i][0]))
    return order


class BucketBatches:
    """Pipeline stage (after the per-sample transform): examples in, collated batches out.

    Yields exactly ``batches_per_epoch`` full batches, like ``batched(partial=False)`` followed by
    a cut: the last buffer holds only the batches still owed, so every worker of every rank runs
    the same number of steps and an epoch consumes the same samples as unbucketed batching. The
    stage is built for one (rank, worker, epoch) stream (``train_epochs.TrainEpochs``) and ``seed``
    names that stream; each buffer's batch order is shuffled with a seed of (seed, buffer index),
    so a resumed epoch that skipped whole buffers before decoding shuffles the next one as the
    uninterrupted run did, and drops the first ``skip`` batches of it.
    """

    def __init__(self, batch_size: int, bucket_batches: int, batches_per_epoch: int, seed: int = 0,
                 rank: int = 0, collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate,
                 first_buffer: int = 0, skip: int = 0) -> None:
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError(f"batch_size={batch_size}, bucket_batches={bucket_batches}: both must be >= 1")
        self.batch_size, self.bucket_batches = batch_size, bucket_batches
        self.batches_per_epoch = batches_per_epoch
        self.seed, self.rank = seed, rank
        self.collate_fn = collate_fn
        self.first_buffer, self.skip = first_buffer, skip

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        src = iter(src)
        owed, index, skip = self.batches_per_epoch, self.first_buffer, self.skip
        while owed > 0:
            wanted = min(self.bucket_batches, owed) * self.batch_size
            buffer = list(islice(src, wanted))
            full = len(buffer) // self.batch_size * self.batch_size
            if full == 0:
                return
            buffer = buffer[:full]  # a finite source that ran dry: full batches only, as partial=False
            order = grid_order([sample_cost(e) for e in buffer], self.batch_size)
            batches = [order[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
            # A string seed is hashed with SHA-512 by ``random``: the same in every process.
            random.Random(f"{self.seed}-{self.rank}-{index}").shuffle(batches)
            for rows in batches[skip:]:
                yield self.collate_fn([buffer[i] for i in rows])
            owed -= len(batches)
            index, skip = index + 1, 0
            if len(buffer) < wanted:
                return


def _requests(values: list[Any]) -> list[list[Patched]]:
    """The per-product view lists of a list-valued images field; mined negatives nest one level
    deeper (sample → slot → views). Empty lists are missing negatives: the model encodes nothing."""
    out: list[list[Patched]] = []
    for v in values:
        if v and isinstance(v[0], list):
            out += [p for p in v if p]
        elif v:
            out.append(v)
    return out


def padding_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(padded slots, all slots) of a collated batch's image fields, summed over the fields.

    Tensor fields: view slots, from the ``*_mask`` (a missing negative's slots count: they are
    stacked and computed on). List fields (Qwen): patch positions, every product padded to the
    longest product of its field in the batch, as the model pads its sequences."""
    padded = total = 0
    for key, value in batch.items():
        if not key.endswith("images"):
            continue
        if isinstance(value, torch.Tensor):
            mask = batch[key.replace("images", "mask")]
            total += mask.numel()
            padded += mask.numel() - int(mask.sum())
            continue
        costs = [views_cost(r) for r in _requests(value)]
        if costs:
            slots = max(costs) * len(costs)
            total += slots
            padded += slots - sum(costs)
    return padded, total


class TagPadding:
    """Last-but-one training stage: attach the batch's ``padding_counts`` for the main process."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch["_padding"] = padding_counts(batch)
        return batch
