"""The products a service shows: metadata and view images read from the gallery's own shards.

Every read goes through the split's byte-offset index (``datamodules.negatives.GalleryReader``):
an id is looked up in that index and nothing else, so no id, however written (``../``, ``%2F``,
absolute paths, NUL bytes), can name a file; the only files ever opened are the gallery shards the
index lists. Ids shown to users are the ones evaluation and ``cir search`` report: the dataset's
own id (``raw_id``) where it has one, else the shard key.
"""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.batching import caption_of, views_of
from datamodules.negatives import GalleryReader
from datamodules.schema import MAX_VIEWS
from datamodules.shards import decode_sample, read_manifest, shard_urls

MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class UnknownProduct(KeyError):
    """An id that is not in the dataset's gallery (the message says which and where)."""

    def __str__(self) -> str:
        return str(self.args[0])


class GalleryStore:
    """One split's gallery products by (dataset, shown id); safe to call from several threads."""

    def __init__(self, data_dir: str | Path, split: str, captions: dict[str, str] | None = None) -> None:
        self.reader = GalleryReader(data_dir, split)
        self.split = split
        self.captions = captions
        self._shown = {d: {pid: pid for pid in ps} for d, ps in self.reader.products.items()}
        self._raw_id: dict[str, dict[str, str]] = {}
        for dataset, aliases in self.reader.aliases.items():
            for raw, pid in aliases.items():
                self._shown[dataset].pop(pid, None)
                self._shown[dataset][raw] = pid
                self._raw_id.setdefault(dataset, {})[pid] = raw
        self._sorted = {d: sorted(ids) for d, ids in self._shown.items()}  # listings page through these
        # One reader, one set of file offsets: a view request and a query's source must not interleave seeks.
        self._lock = threading.Lock()

    @property
    def datasets(self) -> list[str]:
        return sorted(self._shown)

    def ids(self, dataset: str) -> list[str]:
        return self._sorted[dataset]

    def has(self, dataset: str, shown_id: str) -> bool:
        return shown_id in self._shown.get(dataset, {})

    def product_id(self, dataset: str, shown_id: str) -> str:
        if dataset not in self._shown:
            raise UnknownProduct(f"unknown dataset {dataset!r}; the {self.split} gallery holds {self.datasets}")
        try:
            return self._shown[dataset][shown_id]
        except KeyError:
            raise UnknownProduct(f"no product {shown_id!r} in the {self.split} gallery of {dataset}") from None

    def shown_id(self, dataset: str, product_id: str) -> str:
        return self._raw_id.get(dataset, {}).get(product_id, product_id)

    def _raw(self, dataset: str, shown_id: str) -> dict[str, Any]:
        pid = self.product_id(dataset, shown_id)
        with self._lock:
            return self.reader.raw_sample(dataset, pid)

    def sample(self, dataset: str, shown_id: str) -> dict[str, Any]:
        """The product decoded as the gallery pipeline decodes it (views as lazy JPEGs)."""
        return decode_sample(self._raw(dataset, shown_id))

    def source(self, dataset: str, shown_id: str) -> tuple[list[Image.Image], str]:
        """The product as a query's source: its views and the caption a query from it carries (a
        ``cir caption`` sidecar's, else its own)."""
        sample = self.sample(dataset, shown_id)
        return views_of(sample, "view"), caption_of(sample["json"], self.captions)

    def examples(self, dataset: str, n: int) -> list[dict[str, Any]]:
        """The first ``n`` triplets of ``dataset`` in the split whose source and target are in the
        gallery, read from the triplet shards' json members only (images are skipped, not read)."""
        out: list[dict[str, Any]] = []
        for url in shard_urls(self.reader.data_dir, read_manifest(self.reader.data_dir), self.split, "triplets"):
            with tarfile.open(url) as tar:
                for info in tar:
                    if not (info.isfile() and info.name.endswith(".json")):
                        continue
                    t = json.loads(tar.extractfile(info).read()).get("triplet", {})
                    if t.get("dataset") != dataset or not t.get("target_id"):
                        continue
                    source, target = self.shown_id(dataset, t["source_id"]), self.shown_id(dataset, t["target_id"])
                    if self.has(dataset, source) and self.has(dataset, target):
                        out.append({"source_id": source, "target_id": target, "text": t["modification_short"],
                                    "long_text": t.get("modification_long", "")})
                    if len(out) >= n:
                        return out
        return out

    def describe(self, dataset: str, shown_id: str) -> dict[str, Any]:
        raw = self._raw(dataset, shown_id)
        meta = decode_sample({k: v for k, v in raw.items() if k.startswith("__") or k == "json"})["json"]
        views = [n for i in range(MAX_VIEWS) for n in (f"view{i}.jpg", f"view{i}.png") if n in raw]
        return {"id": shown_id, "dataset": dataset, "product_id": meta.get("product_id"),
                "category": meta.get("category", ""), "view_names": meta.get("view_names", []),
                "captions": {"short": meta.get("short_caption", ""), "long": meta.get("long_caption", ""),
                             "views": meta.get("view_captions", []), "query": caption_of(meta, self.captions)},
                "attributes": meta.get("attributes", {}), "views": len(views)}

    def view_image(self, dataset: str, shown_id: str, n: int) -> tuple[bytes, str]:
        """The ``n``-th view's bytes as stored in the shard, and its media type."""
        raw = self._raw(dataset, shown_id)
        for ext in ("jpg", "png"):
            member = raw.get(f"view{n}.{ext}")
            if member is not None:
                return member, MEDIA_TYPES[ext]
        raise UnknownProduct(f"product {shown_id!r} of {dataset} has no view {n}")
