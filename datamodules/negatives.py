"""Mined hard negatives: the sidecar ``cir mine-negatives`` writes, and their views in training batches.

The sidecar ``{data_dir}/negatives-{split}.json`` holds, per triplet sample key, the ids of the
gallery products mined as its negatives (best first, all of the triplet's dataset and split),
their scores and the positive's score, plus the settings and the triplet shards it was mined from.
With ``data.init_args.hard_negatives=K`` every training sample gets the views of its first K
(``negative_images``, ``negative_mask``, ``negative_ids``; missing slots are empty).

Products are read by id from the split's gallery shards through an index of byte ranges,
``{split}-gallery-offsets.json``, cached next to the shards (rebuilt when a shard's size or mtime
changes): one seek and one read per member (the json and each view). Holding the gallery in memory
instead is not an option at scale: FashionMV's train gallery (~70K products × up to 5 views) is
gigabytes of JPEG, in every worker of every rank. The members read are decoded by
``shards.decode_sample`` and transformed as the gallery loader's are, so a negative's views are
exactly what evaluation would feed the target encoder for that product.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .atomic import write_json_atomic
from .batching import views_of
from .sample_index import keyed_members, shard_stamp
from .shards import IMAGE_EXTS, JSON_EXTS, decode_sample, read_manifest, shard_urls

log = logging.getLogger(__name__)

NEGATIVES_FORMAT = "fashion-cir-negatives/1"
OFFSETS_FORMAT = "fashion-cir-gallery-offsets/2"

# (shard number, sample key, [(member extension, offset, size)]) of one product.
Location = tuple[int, str, list[tuple[str, int, int]]]


def negatives_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"negatives-{split}.json"


def offsets_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}-gallery-offsets.json"


def mine_command(split: str) -> str:
    return f"cir mine-negatives --config EXP --ckpt CKPT --split {split}"


# --- the sidecar ---------------------------------------------------------------------------------


def write_negatives(data_dir: str | Path, split: str, records: dict[str, dict[str, Any]],
                    settings: dict[str, Any]) -> Path:
    """Write the sidecar of ``split``; ``records`` maps triplet keys to ``{"dataset", "target_id",
    "ids", "scores", "positive"}``; ``settings`` (k, margin, model...) is stored alongside."""
    manifest = read_manifest(data_dir)
    body = {"format": NEGATIVES_FORMAT, "split": split, **settings,
            "triplet_shards": manifest["splits"][split]["shards"]["triplets"],
            "triplets": manifest["splits"][split]["triplets"], "records": records}
    return write_json_atomic(negatives_path(data_dir, split), body)


def read_negatives(data_dir: str | Path, split: str, wanted: int) -> dict[str, list[str]]:
    """{triplet key: the first ``wanted`` negative ids}, after checking the sidecar belongs to this
    folder as it is now; every problem is reported at once, with the command that rewrites it."""
    path = negatives_path(data_dir, split)
    fix = f"write it with `{mine_command(split)}` (data.init_args.data_dir={data_dir})"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data.init_args.hard_negatives={wanted} trains with mined "
                                f"negatives; {fix}")
    body = json.loads(path.read_text())
    split_info = read_manifest(data_dir)["splits"][split]
    problems = []
    if body.get("format") != NEGATIVES_FORMAT:
        problems.append(f"format {body.get('format')!r}, expected {NEGATIVES_FORMAT!r}")
    if body.get("k", 0) < wanted:
        problems.append(f"mined k={body.get('k')} per triplet, fewer than data.init_args.hard_negatives={wanted} "
                        "(lower hard_negatives or mine again with a larger --k)")
    if (body.get("triplet_shards"), body.get("triplets")) != (split_info["shards"]["triplets"],
                                                             split_info["triplets"]):
        problems.append("mined from other triplet shards than the folder holds now")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems) + f"; {fix}")
    return {key: list(rec["ids"][:wanted]) for key, rec in body["records"].items()}


# --- reading gallery products by id ----------------------------------------------------------------


def _scan_shard(path: Path, number: int, products: dict[str, dict[str, Location]],
                aliases: dict[str, dict[str, str]]) -> None:
    """Add every product of one gallery tar, named by its json, located by its image and json
    members (the only ones ``decode_sample`` reads), and its dataset's own id where that differs
    (``raw_id``: what evaluation and the indexes report). Keys and extensions split as WebDataset
    splits them (``sample_index.keyed_members``)."""
    found: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as tar:
        for info, key, ext in keyed_members(tar):
            entry = found.setdefault(key, {"members": [], "meta": None})
            if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS | JSON_EXTS:
                entry["members"].append((ext, info.offset_data, info.size))
            if ext == "json":
                entry["meta"] = json.loads(tar.extractfile(info).read())
    for key, entry in found.items():
        meta = entry["meta"]
        if meta is not None:
            products.setdefault(meta["dataset"], {})[meta["product_id"]] = (number, key, entry["members"])
            if meta.get("raw_id") and meta["raw_id"] != meta["product_id"]:
                aliases.setdefault(meta["dataset"], {})[meta["raw_id"]] = meta["product_id"]


Offsets = tuple[list[str], dict[str, dict[str, Location]], dict[str, dict[str, str]]]


def gallery_offsets(data_dir: str | Path, split: str) -> Offsets:
    """(gallery shard names, {dataset: {product id: location}}, {dataset: {raw id: product id}}) of
    ``split``, from the cached index when it still matches the shards, else scanned (tar headers and
    json members only) and cached."""
    data_dir = Path(data_dir)
    urls = [Path(u) for u in shard_urls(data_dir, read_manifest(data_dir), split, "gallery")]
    stamps = [shard_stamp(u) for u in urls]
    cache = offsets_path(data_dir, split)
    if cache.is_file():
        body = json.loads(cache.read_text())
        if body.get("format") == OFFSETS_FORMAT and body.get("shards") == stamps:
            products = {d: {pid: (loc[0], loc[1], [tuple(m) for m in loc[2]]) for pid, loc in ps.items()}
                        for d, ps in body["products"].items()}
            return [s["name"] for s in stamps], products, body["aliases"]
    products: dict[str, dict[str, Location]] = {}
    aliases: dict[str, dict[str, str]] = {}
    for number, url in enumerate(urls):
        _scan_shard(url, number, products, aliases)
    try:
        write_json_atomic(cache, {"format": OFFSETS_FORMAT, "split": split, "shards": stamps, "products": products,
                                  "aliases": aliases})
    except OSError as error:  # a read-only data folder (a shared mount): scan again next time
        log.warning("could not cache the gallery offsets in %s (%s); they are rescanned at every start", cache, error)
    return [s["name"] for s in stamps], products, aliases


class GalleryReader:
    """A split's gallery products by (dataset, id): one seek and one read per member.

    File handles open lazily in the process that reads (a DataLoader worker) and are never shared
    with a forked child, whose reads would move the parent's file offsets."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.shards, self.products, self.aliases = gallery_offsets(data_dir, split)
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def raw_sample(self, dataset: str, product_id: str) -> dict[str, Any]:
        """The product's sample as the tar iterator yields it: key, url and member bytes."""
        try:
            number, key, members = self.products[dataset][product_id]
        except KeyError:
            raise KeyError(f"product {product_id!r} of {dataset!r} is not in the {self.split} gallery of "
                           f"{self.data_dir}; mine the negatives again ({mine_command(self.split)})") from None
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if number not in self._files:
            self._files[number] = (self.data_dir / self.shards[number]).open("rb")
        f = self._files[number]
        sample: dict[str, Any] = {"__key__": key, "__url__": str(self.data_dir / self.shards[number])}
        for ext, offset, size in members:
            f.seek(offset)
            sample[ext] = f.read(size)
        return sample

    def views(self, dataset: str, product_id: str) -> list[Image.Image]:
        """The product's views, decoded as the gallery pipeline decodes them."""
        return views_of(decode_sample(self.raw_sample(dataset, product_id)), "view")


# --- the training stage ------------------------------------------------------------------------------


class WithNegatives:
    """Training map: a triplet example plus the views of its first ``k`` mined negatives.

    ``negative_images`` is a list of ``k`` products (``[V, 3, H, W]`` stacks, or lists of Qwen
    patch grids) and ``negative_ids`` their ids; a triplet with fewer negatives (few candidates
    passed the miner's filter) has empty products and ids "" in the remaining slots, which
    ``collate`` turns into all-False mask rows."""

    def __init__(self, example: Callable[[dict[str, Any]], dict[str, Any]], transform: Callable[[Image.Image], Any],
                 negatives: dict[str, list[str]], reader: GalleryReader, k: int) -> None:
        self.example, self.transform = example, transform
        self.negatives, self.reader, self.k = negatives, reader, k

    def for_epoch(self, epoch: int) -> WithNegatives:
        return WithNegatives(self.example.for_epoch(epoch), self.transform, self.negatives, self.reader, self.k)

    def _stack(self, views: list[Image.Image]) -> torch.Tensor | list[Any]:
        out = [self.transform(v) for v in views]
        return torch.stack(out) if isinstance(out[0], torch.Tensor) else out

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = self.example(sample)
        dataset = sample["json"]["triplet"]["dataset"]
        ids = self.negatives.get(sample["__key__"], [])[: self.k]
        stacks = [self._stack(self.reader.views(dataset, pid)) for pid in ids]
        source = out["source_images"]
        empty = source.new_zeros((0, *source.shape[1:])) if isinstance(source, torch.Tensor) else []
        out["negative_images"] = stacks + [empty] * (self.k - len(stacks))
        out["negative_ids"] = ids + [""] * (self.k - len(ids))
        return out
