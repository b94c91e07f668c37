"""Turning decoded shard samples into model inputs, and padding multi-view products into batches.

A product has 1-5 views; a batch stacks them into ``[B, V, 3, H, W]`` with ``V`` the largest view
count in the batch and a boolean ``[B, V]`` mask saying which slots hold a real view.

Views arrive as PIL images; in the training and evaluation pipelines a JPEG view is still undecoded
(``fast_decode.LazyJpeg``), so a transform that knows its output size (the backbones') can decode it
at a reduced scale, while any other transform simply gets the full-size picture when it reads it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .fast_decode import CorruptSample, sample_where
from .schema import MAX_VIEWS

ImageTransform = Callable[[Image.Image], torch.Tensor]
TextMode = Literal["short", "long", "mixed", "fashioniq"]
QueryViews = Literal["all", "first"]


class ResizeToTensor:
    """Default transform: square resize and [0, 1] scaling. Backbones replace it with their own."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB").resize((self.size, self.size), Image.BICUBIC), dtype=np.float32)
        return torch.from_numpy(arr / 255.0).permute(2, 0, 1)


class TargetPad:
    """CLIP4Cir's "targetpad" preprocessing for FashionIQ: pad an image whose aspect ratio exceeds
    ``target_ratio`` (1.25) with black bars until it reaches it, then apply ``transform``. Product
    photos are tall; a plain centre crop would cut off hems and necklines."""

    def __init__(self, target_ratio: float, transform: ImageTransform) -> None:
        self.target_ratio = target_ratio
        self.transform = transform

    def pad(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if max(w, h) / min(w, h) < self.target_ratio:
            return img
        side = max(w, h) / self.target_ratio
        hp, vp = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
        out = Image.new(img.mode, (w + 2 * hp, h + 2 * vp), 0)
        out.paste(img, (hp, vp))
        return out

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(self.pad(img))


def stack_views(views: list[Image.Image], transform: ImageTransform) -> torch.Tensor | list[Any]:
    """Views as one ``[V, 3, H, W]`` tensor, or as a list when the transform returns something
    else (Qwen's variable-size patch grids, which cannot be stacked)."""
    out = [transform(v) for v in views[:MAX_VIEWS]]
    return torch.stack(out) if isinstance(out[0], torch.Tensor) else out


def views_of(sample: dict[str, Any], prefix: str) -> list[Image.Image]:
    views = []
    for i in range(MAX_VIEWS):
        img = sample.get(f"{prefix}{i}.jpg")
        if img is None:
            img = sample.get(f"{prefix}{i}.png")
        if img is None:
            break
        views.append(img)
    if not views:
        raise CorruptSample(f"{sample_where(sample)}: no '{prefix}0.jpg' member: not a "
                            f"{'gallery' if prefix == 'view' else 'triplet'} sample")
    return views


# Metadata keys the example classes read unconditionally: a shard sample without one is damaged.
TRIPLET_SAMPLE_KEYS = ("triplet", "source")
TRIPLET_KEYS = ("source_id", "target_id", "dataset", "modification_short")
PRODUCT_KEYS = ("product_id", "dataset")


def require_keys(mapping: Any, keys: tuple[str, ...], what: str, sample: dict[str, Any]) -> dict[str, Any]:
    """``mapping`` when it is a dict holding every one of ``keys``; else ``CorruptSample`` naming the
    sample and the first missing key (a bare KeyError deep in an example would look like a bug)."""
    if not isinstance(mapping, dict):
        raise CorruptSample(f"{sample_where(sample)}: {what} is a {type(mapping).__name__}, not a JSON object")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise CorruptSample(f"{sample_where(sample)}: {what} has no {missing[0]!r} key"
                            + (f" (nor {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else ""))
    return mapping


def fashioniq_text(captions: list[str], rng: random.Random | None) -> str:
    """CLIP4Cir's FashionIQ text: "c1 and c2" for evaluation (``rng`` None); in training one of
    "c1 and c2", "c2 and c1", "c1", "c2", each caption stripped of ".?, " and capitalised."""
    c = [x.strip(".?, ").capitalize() for x in captions[:2]]
    if len(c) < 2:
        return c[0] if c else ""
    if rng is None:
        return f"{c[0]} and {c[1].lower()}"
    form = rng.randrange(4)
    return [f"{c[0]} and {c[1].lower()}", f"{c[1]} and {c[0].lower()}", c[0], c[1]][form]


def pick_text(triplet: dict[str, Any], mode: TextMode, rng: random.Random) -> str:
    short, long = triplet["modification_short"], triplet.get("modification_long") or ""
    if mode == "fashioniq":
        return fashioniq_text(triplet.get("relative_captions") or [short], rng)
    if mode == "long" and long:
        return long
    if mode == "mixed" and long and rng.random() < 0.5:
        return long
    return short


def caption_of(product: dict[str, Any] | None, captions: dict[str, str] | None) -> str:
    """A product's caption: the sidecar's (``cir caption``) when it has one, else the dataset's own."""
    if product is None:
        return ""
    if captions:
        found = captions.get(f"{product['dataset']}--{product['product_id']}")
        if found is not None:
            return found
    return product.get("short_caption") or ""


class TripletExample:
    """Sample → dict for one triplet. A class (not a closure) so DataLoader workers can pickle it.

    ``captions`` (from a ``cir caption`` sidecar) maps ``{dataset}--{product_id}`` to a product
    caption and a triplet sample's key to a synthesised modified text. The random text choice
    (long or short, FashionIQ's caption order) is keyed by seed, epoch and sample key, so it does
    not depend on which samples a worker processed before (a resumed epoch skips some).

    ``query_views="first"`` keeps only the source's first view (``src0``), as a query photographed
    from one side; ``source_caption`` is then that view's own caption (empty when the dataset has no
    per-view captions), since a product caption would describe the views that were dropped.
    ``meta`` stays whole: it still names every view of the source.
    """

    def __init__(self, transform: ImageTransform, text_mode: TextMode, with_target: bool = True,
                 seed: int = 0, captions: dict[str, str] | None = None, query_views: QueryViews = "all") -> None:
        self.transform = transform
        self.text_mode = text_mode
        self.with_target = with_target
        self.seed, self.epoch = seed, 0
        self.captions = captions
        self.query_views = query_views

    def for_epoch(self, epoch: int) -> TripletExample:
        out = copy.copy(self)
        out.epoch = epoch
        return out

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = require_keys(sample.get("json"), TRIPLET_SAMPLE_KEYS, "its json", sample)
        t = require_keys(meta["triplet"], TRIPLET_KEYS, "its json's 'triplet'", sample)
        if self.captions:  # caption_of looks products up by dataset and id
            for role in ("source", "target"):
                if meta.get(role) is not None:
                    require_keys(meta[role], PRODUCT_KEYS, f"its json's {role!r}", sample)
        rng = random.Random(f"{self.seed}|{self.epoch}|{sample.get('__key__')}")
        source_views = views_of(sample, "src")
        source_caption = caption_of(meta["source"], self.captions)
        if self.query_views == "first":
            source_views = source_views[:1]
            source_caption = ((meta["source"] or {}).get("view_captions") or [""])[0]
        out = {
            "source_images": stack_views(source_views, self.transform),
            "text": pick_text(t, self.text_mode, rng),
            "source_id": t["source_id"],
            "target_id": t["target_id"] or "",
            "dataset": t["dataset"],
            "source_caption": source_caption,
            "target_caption": caption_of(meta.get("target"), self.captions),
            "modified_text": (self.captions or {}).get(sample["__key__"], ""),
            "meta": meta,
        }
        if self.with_target and t["target_id"] is not None:
            out["target_images"] = stack_views(views_of(sample, "tgt"), self.transform)
        return out


class GalleryExample:
    def __init__(self, transform: ImageTransform, captions: dict[str, str] | None = None) -> None:
        self.transform = transform
        self.captions = captions

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = require_keys(sample.get("json"), PRODUCT_KEYS, "its json", sample)
        return {"images": stack_views(views_of(sample, "view"), self.transform),
                "product_id": meta["product_id"], "dataset": meta["dataset"],
                "caption": caption_of(meta, self.captions), "meta": meta}


def pad_views(stacks: list[Any]) -> tuple[torch.Tensor | list[Any], torch.Tensor]:
    """``[B, V, ...]`` zero-padded views and the ``[B, V]`` mask; lists of views stay lists.

    Items that are themselves lists of products (mined negatives: K ``[V, 3, H, W]`` stacks or K
    Qwen view lists per sample) give ``[B, K, V, ...]`` (or the nested lists) and a ``[B, K, V]``
    mask; a product with no views (a missing negative) is an all-False row, and V is at least 1.
    A Qwen product is already a list (of ``PatchedImage``): nesting shows one level deeper."""
    if isinstance(stacks[0], list) and any(isinstance(p, list | torch.Tensor) for s in stacks for p in s):
        k = max(len(s) for s in stacks)
        v = max([1, *(len(p) for s in stacks for p in s)])
        mask = torch.zeros(len(stacks), k, v, dtype=torch.bool)
        for i, s in enumerate(stacks):
            for j, p in enumerate(s):
                mask[i, j, : len(p)] = True
        like = next((p for s in stacks for p in s if isinstance(p, torch.Tensor)), None)
        if like is None:
            return [[list(p) for p in s] + [[] for _ in range(k - len(s))] for s in stacks], mask
        nested = like.new_zeros((len(stacks), k, v, *like.shape[1:]))
        for i, s in enumerate(stacks):
            for j, p in enumerate(s):
                if len(p):
                    nested[i, j, : len(p)] = p
        return nested, mask
    v = max(len(s) for s in stacks)
    if not isinstance(stacks[0], torch.Tensor):
        mask = torch.tensor([[i < len(s) for i in range(v)] for s in stacks], dtype=torch.bool)
        return list(stacks), mask
    out = stacks[0].new_zeros((len(stacks), v, *stacks[0].shape[1:]))
    mask = torch.zeros(len(stacks), v, dtype=torch.bool)
    for i, s in enumerate(stacks):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pads every ``*images`` field and adds its ``*mask`` (``[B, K, V]`` for mined negatives);
    other fields become lists (``negative_ids``: a list of K ids per sample)."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key.endswith("images"):
            batch[key], batch[key.replace("images", "mask")] = pad_views(values)
        else:
            batch[key] = values
    return batch
