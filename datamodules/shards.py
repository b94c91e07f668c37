"""WebDataset shards: the on-disk format every dataset is converted to, and its safe decoding.

A shard folder holds ``manifest.json`` and, per split, ``{split}-triplets-NNNNNN.tar`` (one triplet
per sample: source views, target views, texts as JSON) and ``{split}-gallery-NNNNNN.tar`` (one
product per sample). Member names are ``src0.jpg``…, ``tgt0.jpg``…, ``view0.jpg``…, ``json``.

Decoding is done here, not with ``webdataset.decode``: its default handlers unpickle ``.pyd`` /
``.pickle`` members, and shards are data from elsewhere. Only image, JSON and text members are ever
decoded; anything else is dropped unread. In the training and evaluation pipelines a colour JPEG view
stays undecoded (``fast_decode.LazyJpeg``) until the model's transform knows the size it needs.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from .fast_decode import decode_now, open_view
from .schema import Product, Triplet, safe_key

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}
TEXT_EXTS = {"txt"}
JSON_EXTS = {"json"}
# Below this many bytes a member cannot be a real image of any size we write; fail fast and clearly.
_MIN_IMAGE_BYTES = 16


def encode_image(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_product(product: Product) -> tuple[dict[str, Any], list[bytes]]:
    """Metadata and JPEG bytes of a product: what shards store, a fraction of the decoded size."""
    return product.meta(), [encode_image(v) for v in product.views]


def gallery_key(dataset: str, product_id: str) -> str:
    return safe_key(f"{dataset}--{product_id}")


class ShardSetWriter:
    """Writes one split's triplet and gallery shards and tallies what went where."""

    def __init__(self, out_dir: str | Path, split: str, maxcount: int = 500) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.maxcount = maxcount
        self.counts = {"triplets": 0, "products": 0}
        self._writers: dict[str, wds.ShardWriter] = {}

    def _writer(self, kind: str) -> wds.ShardWriter:
        if kind not in self._writers:
            pattern = str(self.out_dir / f"{self.split}-{kind}-%06d.tar")
            self._writers[kind] = wds.ShardWriter(pattern, maxcount=self.maxcount, verbose=0)
        return self._writers[kind]

    def write_product(self, meta: dict[str, Any], views: list[bytes]) -> None:
        sample: dict[str, Any] = {"__key__": gallery_key(meta["dataset"], meta["product_id"]), "json": meta}
        sample.update({f"view{i}.jpg": b for i, b in enumerate(views)})
        self._writer("gallery").write(sample)
        self.counts["products"] += 1

    def write_triplet(self, triplet: Triplet, source: tuple[dict[str, Any], list[bytes]],
                      target: tuple[dict[str, Any], list[bytes]] | None) -> None:
        """One query sample; ``target`` None writes a query-only sample (test splits without answers)."""
        meta = {"triplet": triplet.meta(), "source": source[0], "target": target[0] if target else None}
        # The running index keeps keys unique: one pair can come with several modification texts.
        key = safe_key(f"{triplet.dataset}--{self.counts['triplets']:07d}--{triplet.key}")
        sample: dict[str, Any] = {"__key__": key, "json": meta}
        sample.update({f"src{i}.jpg": b for i, b in enumerate(source[1])})
        if target is not None:
            sample.update({f"tgt{i}.jpg": b for i, b in enumerate(target[1])})
        self._writer("triplets").write(sample)
        self.counts["triplets"] += 1

    def close(self) -> dict[str, Any]:
        for w in self._writers.values():
            w.close()
        shards = {kind: sorted(p.name for p in self.out_dir.glob(f"{self.split}-{kind}-*.tar"))
                  for kind in ("triplets", "gallery")}
        return {**self.counts, "shards": shards}


def write_manifest(out_dir: str | Path, splits: dict[str, dict[str, Any]], datasets: Iterable[str],
                   source: dict[str, Any]) -> Path:
    path = Path(out_dir) / MANIFEST
    manifest = {"format": "fashion-cir-shards/1", "datasets": sorted(set(datasets)), "splits": splits,
                "source": source}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)  # atomic: a half-written manifest must never look like finished data
    return path


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a shard folder. Create one with `cir data synthetic --out "
            f"{data_dir}` (generated data) or a converter (`cir data --help`)."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "fashion-cir-shards/1":
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}; expected 'fashion-cir-shards/1'")
    return manifest


def shard_urls(data_dir: str | Path, manifest: dict[str, Any], split: str, kind: str) -> list[str]:
    if split not in manifest["splits"]:
        raise KeyError(f"{Path(data_dir) / MANIFEST}: no split {split!r}; it has {sorted(manifest['splits'])}")
    return [str(Path(data_dir) / name) for name in manifest["splits"][split]["shards"][kind]]


# --- reading ------------------------------------------------------------------------------------


class SkipCounter:
    """WebDataset error handler that skips a bad sample, counts it and warns with its origin.

    One instance lives in each DataLoader worker; the count travels with every batch (see
    ``tag_skipped``) so the main process can total it across workers.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping a corrupt sample in %s (%d skipped so far): %r", self.name, self.count, exn)
        return True


def decode_sample(sample: dict[str, Any], lazy: bool = True) -> dict[str, Any]:
    """Decode image/JSON/text members; every other member is dropped without being read.

    ``lazy``: colour JPEG views become ``LazyJpeg`` images, decoded when first used (at a reduced
    scale by the backbones' transforms), so a corrupt one fails in the transform, not here; other
    images are always decoded here. Off: every image is fully decoded here, as RGB.
    """
    out: dict[str, Any] = {}
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    for name, value in sample.items():
        if name.startswith("__"):
            out[name] = value
            continue
        ext = name.rsplit(".", 1)[-1].lower()
        if ext in IMAGE_EXTS:
            if len(value) < _MIN_IMAGE_BYTES:
                raise ValueError(f"{where}: member {name!r} has {len(value)} bytes, not an image")
            out[name] = open_view(value) if lazy else decode_now(value)
        elif ext in JSON_EXTS:
            out[name] = json.loads(value)
        elif ext in TEXT_EXTS:
            out[name] = value.decode("utf-8")
    if "json" not in out:
        raise ValueError(f"{where}: sample has no json member")
    return out


def iterate_shards(urls: list[str], handler: Callable[[Exception], bool] | None = None,
                   lazy: bool = False) -> Iterable[dict]:
    """Decoded samples of ``urls`` in order, single process (converters, captioners, tests).

    Images are fully decoded by default, so a corrupt sample is skipped here (with ``handler``)
    rather than failing its reader later; ``lazy`` as in ``decode_sample``.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=handler or wds.reraise_exception),
        wds.map(partial(decode_sample, lazy=lazy), handler=handler or wds.reraise_exception),
    )
    return iter(pipeline)
