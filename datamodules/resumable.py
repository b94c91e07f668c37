"""The training stream as a deterministic schedule: which batch comes next depends only on (seed,
rank, epoch, how many batches of the epoch were consumed), so a resumed run continues exactly where
the killed one stopped, by skipping raw samples before they are decoded.

Why our own: Lightning saves and restores a train loader's ``state_dict`` when it has one, but
WebDataset's stages keep their position in objects inside the DataLoader workers (shard RNG, shuffle
buffer, epoch counters) that neither library can capture, and torchdata's ``StatefulDataLoader``
would have to pickle each worker's shuffle buffer of decoded samples. A schedule needs no snapshot:
each epoch's pipeline is rebuilt from seeds that name the epoch and the worker, and the position is
one number per run, the batches Lightning has processed.

How batches map to workers: a DataLoader with W workers takes batch i from worker i mod W. After
``k`` consumed batches, worker w has delivered k // W batches, plus one if w < k mod W. A resumed
DataLoader starts again at worker 0, so for the resumed epoch each worker plays the part of worker
(id + k mod W) mod W; from the next epoch on the workers are themselves again. Training workers are
started afresh every epoch (not persistent) so that each starts from the stream's current epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import IterableDataset


class EpochBatches(Protocol):
    """Builds one worker's batches of one epoch: ``batches(epoch, worker, done)`` yields the
    worker's batches from number ``done`` on (the first ``done`` skipped without decoding)."""

    batches_per_worker: int

    def batches(self, epoch: int, worker: int, done: int) -> Iterator[dict[str, Any]]: ...


def worker_position(consumed: int, worker: int, workers: int) -> tuple[int, int]:
    """(the worker this DataLoader worker plays, batches that one already delivered) for a loader
    resumed after ``consumed`` batches of the epoch (see the module docstring)."""
    shift = consumed % workers
    role = (worker + shift) % workers
    return role, consumed // workers + (1 if role < shift else 0)


def batches_per_epoch(length: int, limit: int | float) -> int:
    """Lightning's rule for ``limit_train_batches``: an int caps the count, a float is a share.
    Computed here because a resumed run iterates its loader before the Trainer has counted them."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(length, limit)
    return int(length * limit)


class TrainStream(IterableDataset):
    """One epoch of training batches per ``__iter__``: epoch ``epoch`` resumed after ``consumed``
    batches (0: from its start), both set by ``ResumableLoader`` before each iteration. Training
    workers are not persistent, so every iteration's workers start from a fresh copy of both."""

    def __init__(self, epochs: EpochBatches) -> None:
        self.epochs = epochs
        self.epoch = 0
        self.consumed = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        role, done = worker_position(self.consumed, worker, workers)
        yield from self.epochs.batches(self.epoch, role, done)


class ResumableLoader:
    """The train DataLoader with Lightning's stateful-loader interface (``state_dict`` /
    ``load_state_dict``, saved in every checkpoint). The state is the epoch and the batches of it
    Lightning has processed, read from the Trainer's own progress (``progress``: epoch, processed
    batches, the Trainer's ``limit_train_batches``), because the loader itself runs ahead of training
    by its prefetched batches."""

    def __init__(self, loader: Any, stream: TrainStream, progress: Callable[[], tuple[int, int, float]]) -> None:
        self.loader = loader
        self.stream = stream
        self.progress = progress
        self.resume: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Set before the workers start (they copy the stream as it is now). Lightning may iterate a
        # loader more than once per epoch (setting up, then restarting its fetcher), so the epoch
        # comes from the Trainer each time, never from counting iterations.
        epoch, _, limit = self.progress()
        resume = self.resume or {}
        consumed = resume.get("batches", 0) if resume.get("epoch") == epoch else 0
        if consumed >= batches_per_epoch(len(self), limit):
            # Saved at the very end of this epoch: Lightning resumes with the next one, but iterates
            # for it before it counts the epoch as done, so this iteration is already the next epoch.
            epoch, consumed = epoch + 1, 0
        self.stream.epoch, self.stream.consumed = epoch, consumed
        return iter(self.loader)

    def state_dict(self) -> dict[str, int]:
        epoch, batches, _ = self.progress()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume = dict(state)
