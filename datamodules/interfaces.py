"""What models, callbacks and commands may call on a DataModule, declared (``typing.Protocol``).

``ShardDataModule`` (and so ``SyntheticDataModule``) implements it; a user's own DataModule that
does too gets the same wiring: the backbone's preprocessing, dataset names, skipped-sample
counts, retrieval pictures and submission files. ``ReportsPadding`` is separate: a DataModule
without it loses only the ``data/padding_fraction`` metric.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class ProgressSink(Protocol):
    """What a long job reports to (``cir.progress.Progress`` is one): ``update(n)`` as items are done,
    ``expect(n)`` as more work becomes known."""

    def update(self, n: int) -> None: ...

    def expect(self, n: int) -> None: ...


@runtime_checkable
class RetrievalData(Protocol):
    data_dir: Path
    image_transform: Callable[[Any], Any]

    @property
    def datasets(self) -> list[str]:
        """The datasets (categories) of the folder, each evaluated on its own gallery."""
        ...

    @property
    def captions(self) -> dict[str, str] | None: ...

    @property
    def skipped_total(self) -> int:
        """Corrupt samples skipped so far, over all loaders and workers."""
        ...

    @property
    def predict_split(self) -> str: ...

    def set_image_transform(self, transform: Callable[[Any], Any]) -> None: ...

    def eval_dataloaders(self, split: str) -> list[Any]:
        """``[gallery loader, query loader]`` of ``split``."""
        ...

    def split_of(self, trainer_fn: str) -> str:
        """The split a Trainer function (``fit``, ``validate``, ``test``, ``predict``) evaluates."""
        ...

    def example_queries(self, split: str, n: int) -> list[dict[str, Any]]: ...

    def gallery_products(self, split: str, wanted: set[int]) -> dict[int, dict[str, Any]]: ...


@runtime_checkable
class ReportsPadding(Protocol):
    """A DataModule that measures how much of its training batches is padding (``bucket_batches``)."""

    def padding_fraction(self, reset: bool = False) -> float | None:
        """Padded share of the image slots of the training batches since the last reset (None: no batch yet)."""
        ...


@runtime_checkable
class Preprocessed(Protocol):
    """A DataModule whose views the model's own preprocessing should read (its ``setup`` hands the
    backbone's transform over)."""

    def set_image_transform(self, transform: Callable[[Any], Any]) -> None: ...


@runtime_checkable
class PartitionedProducts(Protocol):
    """Products to export in numbered parts, each owned by one rank (``CatalogueDataModule``;
    ``callbacks.EmbeddingWriter`` writes and resumes them)."""

    image_transform: Callable[[Any], Any]

    def export_plan(self) -> dict[str, Any]:
        """What the export holds: source, layout, part count and size, a digest of the products."""
        ...

    def assigned_parts(self, rank: int, world_size: int) -> list[int]: ...

    def exclude_parts(self, done: set[int]) -> None:
        """Leave these (finished) parts out of the predict loader."""
        ...
