"""Where ``cir serve`` finds its gallery: a saved index folder (with its change log), a Milvus
collection, or neither (the split's gallery, embedded at start-up), and where the products'
photos are: the split's shards, a ``cir index`` catalogue folder, and the uploaded ones.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.interfaces import RetrievalData
from datamodules.shards import MANIFEST
from lightning_modules.retrieval import GalleryIndex
from lightning_modules.retrieval.mutable import MutableGallery, is_multi_vector

from ..index import SUMMARY
from ..models import REBUILD, fingerprint_mismatch
from .catalogue import CatalogueStore
from .engine import Gallery, ProductJob, embed_jobs
from .gallery import GalleryStore
from .uploads import UploadStore

PROG = "cir serve"


@dataclass
class Opened:
    gallery: Any  # a ProductStore, or None: embed the split's gallery at start-up
    catalogue: Path | None  # the products' photos come from this catalogue folder, not from shards
    uploads: Path | None  # where photos of products added while serving are kept
    refused: str | None = None  # why writes stay off whatever the key


def catalogue_of(index: Path, given: str | None) -> Path | None:
    """The catalogue a ``cir index`` folder was built from (``catalogue_dir`` in its summary), or
    ``--catalogue``; None for a ``cir search build`` folder (its products are the split's)."""
    if given:
        return Path(given)
    summary = index / SUMMARY
    if not summary.is_file():
        return None
    try:
        recorded = json.loads(summary.read_text()).get("catalogue_dir")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not recorded:
        raise SystemExit(f"{PROG}: --index {index}: {SUMMARY} records no catalogue_dir (indexed before it was "
                         "recorded): give the catalogue folder with --catalogue DIR, or run cir index again")
    if not Path(recorded).is_dir():
        raise SystemExit(f"{PROG}: --index {index}: its catalogue {recorded} (from {SUMMARY}) is not there: give "
                         "the catalogue's new place with --catalogue DIR")
    return Path(recorded)


def open_index(folder: str, catalogue: str | None, uploads: str | None) -> Opened:
    """The index folder with its change log replayed, refused before the model loads when it records
    no fingerprint."""
    path = Path(folder)
    if not (path / "gallery_index.json").is_file():
        raise SystemExit(f"{PROG}: --index {folder}: not a gallery index folder; build one with cir search build "
                         "or cir index, or leave --index out to embed the gallery at start-up")
    base = GalleryIndex.load(path)
    if base.fingerprint is None:
        raise SystemExit(f"{PROG}: {fingerprint_mismatch(None, {}, f'--index {folder}', REBUILD)}")
    refused = None
    if is_multi_vector(base):  # served as it is: the change log adds one vector per product
        gallery: Any = Gallery(index=base)
        refused = f"--index {folder} holds several vectors per product, and its change log one"
    else:
        try:
            gallery = MutableGallery.open(path, base)
        except ValueError as exc:
            raise SystemExit(f"{PROG}: --index {folder}: {exc}") from None
        for note in gallery.notes:
            print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    return Opened(gallery, catalogue_of(path, catalogue), Path(uploads) if uploads else path / "uploads", refused)


def probe(model: Any, dm: RetrievalData, device: Any, dtype: Any) -> Any:
    """One product embedded (a grey picture): the shape of what the model writes to a store."""
    out = embed_jobs(model, dm.image_transform, device, dtype,
                     [ProductJob([Image.new("RGB", (64, 64), (128, 128, 128))], {})])[0]
    if isinstance(out, BaseException):
        raise SystemExit(f"{PROG}: the model could not embed a product: {out}")
    return out


def open_milvus(uri: str, collection: str, fingerprint: dict[str, str], shape: Any) -> Any:
    """A ``MilvusGallery`` for this model (``MILVUS_TOKEN`` authenticates, when set); one of another
    model is refused naming what differs."""
    try:
        # Imported here, by name: pymilvus is an optional extra, needed only by this option.
        module = importlib.import_module("lightning_modules.retrieval.milvus")
    except ImportError as exc:
        raise SystemExit(f"{PROG}: --milvus needs the milvus extra ({exc}): pip install -e '.[milvus]'") from None
    try:
        store = module.MilvusGallery(uri, collection=collection, token=os.environ.get("MILVUS_TOKEN"),
                                     dim=int(shape[-1]), fingerprint=fingerprint, multi_vector=len(shape) == 2)
    except ImportError as exc:  # pymilvus or Milvus Lite missing: the store says which to install
        raise SystemExit(f"{PROG}: --milvus {uri}: {exc}") from None
    except (ValueError, OSError, ConnectionError) as exc:
        raise SystemExit(f"{PROG}: --milvus {uri}: {exc}") from None
    if store.fingerprint is not None and (problem := fingerprint_mismatch(
            store.fingerprint, fingerprint, f"--milvus {uri} collection {collection}", REBUILD)):
        raise SystemExit(f"{PROG}: {problem}")
    return store


def photos(opened: Opened, dm: RetrievalData,
           split: str) -> tuple[GalleryStore | CatalogueStore, UploadStore | None]:
    """Where the products' photos are read: the catalogue folder (a shard folder's ``split``
    gallery when it is one), else the experiment's shards."""
    base: GalleryStore | CatalogueStore
    if opened.catalogue is not None and (opened.catalogue / MANIFEST).is_file():
        base = GalleryStore(opened.catalogue, split)
    elif opened.catalogue is not None:
        try:
            base = CatalogueStore(opened.catalogue)
        except FileNotFoundError as exc:
            raise SystemExit(f"{PROG}: {exc}") from None
    else:
        base = GalleryStore(dm.data_dir, split, dm.captions)
    uploads = UploadStore(opened.uploads) if opened.uploads is not None else None
    held = getattr(opened.gallery, "contains", None)
    if uploads is not None and callable(held):
        uploads.forget_unless(held)
    return base, uploads


def refuse_caption_targets(model: Any) -> str | None:
    """Why this model's products cannot be embedded from photos alone, if so."""
    weight = getattr(model, "target_caption_weight", 0)
    if weight:
        return (f"{type(model).__name__} adds each product's caption to its embedding (target_caption_weight="
                f"{weight}) and an uploaded product has none")
    return None
