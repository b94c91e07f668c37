"""Products to embed, in numbered parts: the data side of the catalogue exporter.

    lightning predict --config EXP --config configs/export/catalogue.yaml --ckpt_path CKPT \\
        --data.init_args.source=data/shop --trainer.callbacks.init_args.out_dir=exports/shop

``source`` is a catalogue folder (``images/<product_id>/*.jpg`` [+ ``products.jsonl``], the layout
``cir build`` reads), the FashionMV release (``images/<dataset>/<product_id>/``: ``layout:
fashionmv``), or a shard folder (``manifest.json``: every gallery product of ``split``). The
products are cut into parts (``part_size`` products of the sorted catalogue, or one gallery shard
each), and part ``p`` belongs to rank ``p mod world_size``; a rank's unfinished parts are dealt to
its DataLoader workers in turn: every product is embedded once, on one GPU or many, and the
assignment needs no communication. ``callbacks.EmbeddingWriter`` writes each part when its last batch is embedded
and, on a rerun, tells this module (``exclude_parts``) which parts are finished, so they are not
read again.

Views are read as evaluation reads a shard's view (``read_view``); a view that does not decode is
skipped and counted, and a product with no readable view is reported in its part, never a crash.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batching import GalleryExample, ImageTransform, ResizeToTensor, TargetPad, collate
from .catalogue import CatalogueProduct, read_catalogue
from .embedding_parts import plan_digest
from .fast_decode import JPEG_MAGIC, CorruptSample, open_view
from .schema import MAX_VIEWS
from .shards import MANIFEST, iterate_shards, read_manifest, shard_urls
from .upright import open_upright, orientation

Layout = Literal["auto", "catalogue", "fashionmv", "shards"]


def read_view(path: Path) -> Image.Image:
    """A view file as evaluation reads a shard's view (``open_view``: a colour JPEG decoded at the
    size the preprocessing needs, so a catalogue product and the same product in shards embed
    alike), unless its EXIF orientation asks for a turn: then decoded whole and turned upright, as
    ``cir build`` writes it and as ``cir serve`` reads an upload."""
    data = path.read_bytes()
    if data.startswith(JPEG_MAGIC):
        with Image.open(io.BytesIO(data)) as header:  # the header only: the orientation is in it
            turned = orientation(header) != 1
        if not turned:
            return open_view(data)
    return open_upright(io.BytesIO(data))


@dataclass(frozen=True)
class Part:
    number: int
    products: tuple[CatalogueProduct, ...] = ()  # catalogue layouts
    shard: str | None = None  # shard layout: one gallery shard


def resolve_layout(source: Path, layout: Layout) -> Layout:
    """``auto`` resolved, and the source checked to have what its layout needs (one line if not)."""
    if layout == "shards" and not (source / MANIFEST).is_file():
        raise FileNotFoundError(f"{source}: no {MANIFEST}; a shard folder is written by `cir data ...`")
    if layout == "fashionmv" and not (source / "images").is_dir():
        raise FileNotFoundError(f"{source}: no images/ folder; the FashionMV release keeps its photos in "
                                "images/<dataset>/<product_id>/")
    if layout == "catalogue" and not (source / "images").is_dir():
        raise FileNotFoundError(f"{source}: no images/ folder; a catalogue is images/<product_id>/*.jpg "
                                "[+ products.jsonl]")
    if layout != "auto":
        return layout
    if (source / MANIFEST).is_file():
        return "shards"
    if (source / "images").is_dir():
        return "catalogue"
    raise FileNotFoundError(f"{source}: no images/ folder (a catalogue: images/<product_id>/*.jpg) and no {MANIFEST} "
                            "(a shard folder); for the FashionMV release (images/<dataset>/<product_id>/) set the "
                            "layout to fashionmv")


class PartStream(IterableDataset):
    """Collated gallery batches of the parts given to this rank and worker. Each batch carries
    ``part``, ``part_end`` (the part's last batch) and the part's ``skipped`` products and
    ``unreadable_views`` count so far; a part with no readable product yields one batch with no
    products (``part_end`` set) so that its writer still marks it done."""

    def __init__(self, parts: list[Part], transform: ImageTransform, batch_size: int) -> None:
        self.parts, self.transform, self.batch_size = parts, transform, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.parts if info is None else self.parts[info.id::info.num_workers]
        for part in mine:
            yield from self._part(part)

    def _part(self, part: Part) -> Iterator[dict[str, Any]]:
        state: dict[str, Any] = {"skipped": [], "unreadable_views": 0}
        examples = self._catalogue(part, state) if part.shard is None else self._shard(part, state)
        pending: list[dict[str, Any]] = []
        previous: dict[str, Any] | None = None
        for example in examples:
            pending.append(example)
            if len(pending) == self.batch_size:
                if previous is not None:
                    yield previous
                previous, pending = self._batch(part, pending, state, end=False), []
        if pending:
            if previous is not None:
                yield previous
            previous = self._batch(part, pending, state, end=True)
        if previous is None:  # nothing readable in the whole part
            previous = self._batch(part, [], state, end=True)
        previous["part_end"] = True
        previous["skipped"], previous["unreadable_views"] = list(state["skipped"]), state["unreadable_views"]
        yield previous

    def _batch(self, part: Part, examples: list[dict[str, Any]], state: dict[str, Any], end: bool) -> dict[str, Any]:
        batch = collate(examples) if examples else {"meta": [], "product_id": [], "dataset": []}
        batch.update(part=part.number, part_end=end, skipped=list(state["skipped"]),
                     unreadable_views=state["unreadable_views"])
        return batch

    def _catalogue(self, part: Part, state: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for product in part.products:
            views = []
            for path in product.views[:MAX_VIEWS]:
                # Read and transformed one by one: a lazily decoded JPEG whose body is damaged fails
                # only in the transform, and must cost its own view, not its product's others.
                try:
                    views.append(self.transform(read_view(path)))
                except (OSError, UnidentifiedImageError, CorruptSample, SyntaxError, ValueError):
                    state["unreadable_views"] += 1
            if not views:
                state["skipped"].append({"product_id": product.product_id, "dataset": product.dataset,
                                         "reason": "no readable view"})
                continue
            images = torch.stack(views) if isinstance(views[0], torch.Tensor) else views  # as stack_views
            yield {"images": images, "product_id": product.product_id, "dataset": product.dataset, "caption": "",
                   "meta": {**product.meta(), "raw_id": product.product_id}}

    def _shard(self, part: Part, state: dict[str, Any]) -> Iterator[dict[str, Any]]:
        example = GalleryExample(self.transform)

        def skip(exn: BaseException) -> bool:
            if isinstance(exn, CorruptSample):
                state["skipped"].append({"product_id": "?", "dataset": "?", "reason": str(exn)})
                return True
            return False

        # Lazily decoded, as evaluation's gallery loader decodes: the same pixels, so the same vectors.
        for sample in iterate_shards([str(part.shard)], handler=skip, lazy=True):
            try:
                yield example(sample)
            except CorruptSample as exc:
                state["skipped"].append({"product_id": str(sample.get("__key__", "?")), "dataset": "?",
                                         "reason": str(exc)})


class CatalogueDataModule(L.LightningDataModule):
    """``predict`` batches of every product of ``source``, in parts (see the module's docstring).

    Args:
        source: a catalogue folder, the FashionMV release root, or a shard folder.
        layout: ``auto`` (a shard folder when it has a manifest, else a catalogue), ``catalogue``,
            ``fashionmv`` (``images/<dataset>/<product_id>/``) or ``shards``.
        split: the shard folder's split whose gallery is exported (shards only).
        dataset: dataset name of catalogue products that ``products.jsonl`` gives none.
        part_size: products per part (catalogue layouts); a shard is one part.
        target_pad_ratio: FashionIQ-style target padding, as the experiment's data section sets it
            (the export records the transform, and ``cir index`` refuses a model whose differs).
    """

    def __init__(self, source: str, layout: Layout = "auto", split: str = "val", dataset: str = "catalogue",
                 batch_size: int = 32, num_workers: int = 2, part_size: int = 1024, image_size: int = 224,
                 target_pad_ratio: float | None = None) -> None:
        super().__init__()
        problems = [f"{key}={value}: must be >= 1" for key, value in
                    (("batch_size", batch_size), ("part_size", part_size)) if value < 1]
        problems += [f"num_workers={num_workers}: must be >= 0"] if num_workers < 0 else []
        if problems:
            raise ValueError("data.init_args: " + "; ".join(problems))
        self.save_hyperparameters()
        self.source = Path(source)
        self.image_transform: ImageTransform = ResizeToTensor(image_size)
        self.set_image_transform(self.image_transform)
        self._parts: list[Part] | None = None
        self.excluded: set[int] = set()
        self.counts: dict[str, int] = {}

    def set_image_transform(self, transform: ImageTransform) -> None:
        ratio = self.hparams.target_pad_ratio
        self.image_transform = TargetPad(ratio, transform) if ratio else transform

    @property
    def parts(self) -> list[Part]:
        if self._parts is None:
            self._parts = self._plan()
        return self._parts

    def _plan(self) -> list[Part]:
        layout = resolve_layout(self.source, self.hparams.layout)
        if layout == "shards":
            urls = shard_urls(self.source, read_manifest(self.source), self.hparams.split, "gallery")
            return [Part(n, shard=url) for n, url in enumerate(urls)]
        catalogue = read_catalogue(self.source, self.hparams.dataset, check_views=False,
                                   dataset_folders=layout == "fashionmv")
        self.counts = dict(catalogue.counts)
        size = self.hparams.part_size
        products = catalogue.products
        return [Part(n, products=tuple(products[n * size:(n + 1) * size]))
                for n in range(math.ceil(len(products) / size))]

    def export_plan(self) -> dict[str, Any]:
        """What an export of this module holds (``EmbeddingWriter`` records and compares it)."""
        keys = [p.shard or "" for p in self.parts] if self.parts and self.parts[0].shard else [
            f"{q.dataset}/{q.product_id}" for p in self.parts for q in p.products]
        return {"source": str(self.source.resolve()), "layout": resolve_layout(self.source, self.hparams.layout),
                "split": self.hparams.split, "parts": len(self.parts), "part_size": self.hparams.part_size,
                "products_digest": plan_digest(keys), "listing": self.counts}

    def assigned_parts(self, rank: int, world_size: int) -> list[int]:
        return [p.number for p in self.parts if p.number % world_size == rank]

    def exclude_parts(self, done: set[int]) -> None:
        self.excluded = set(done)

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        wanted = set(self.assigned_parts(rank, world)) - self.excluded
        parts = [p for p in self.parts if p.number in wanted]
        workers = min(self.hparams.num_workers, len(parts))
        return DataLoader(PartStream(parts, self.image_transform, self.hparams.batch_size), batch_size=None,
                          num_workers=workers, persistent_workers=False)
