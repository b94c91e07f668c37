"""The generated dataset written in the *real* datasets' own layouts, so the FashionIQ and FashionMV
converters run end to end on real image files in CI (the real images cannot be shipped)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .generate import SyntheticData
from .text import relative_captions

# Generated categories that FashionIQ has; skirts and pants have no FashionIQ counterpart.
FASHIONIQ_CATEGORY = {"dress": "dress", "shirt": "shirt", "top": "toptee"}


def write_fashioniq_layout(root: str | Path, data: SyntheticData, seed: int = 0) -> dict[str, Any]:
    """``root/{captions,image_splits,images}`` as FashionIQ has them: one image per product (the front
    view, else the first), two relative captions per triplet, and a test split without targets."""
    root = Path(root)
    for sub in ("captions", "image_splits", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts: dict[str, Any] = {}
    for split in ("train", "val"):
        by_cat: dict[str, list[str]] = {c: [] for c in FASHIONIQ_CATEGORY.values()}
        for spec in data.split_products(split):
            cat = FASHIONIQ_CATEGORY.get(spec.attributes["category"])
            if cat is None:
                continue
            product = spec.render(data.styles[spec.dataset].size)
            view = product.view_names.index("front") if "front" in product.view_names else 0
            product.views[view].save(root / "images" / f"{spec.product_id}.jpg", quality=92)
            by_cat[cat].append(spec.product_id)
        caps: dict[str, list[dict[str, Any]]] = {c: [] for c in by_cat}
        for t in data.triplets[split]:
            cat = FASHIONIQ_CATEGORY.get(data.products[t.source_id].attributes["category"])
            if cat is None:
                continue
            captions = relative_captions(data.products[t.source_id].attributes, t.changes, rng)
            caps[cat].append({"target": t.target_id, "candidate": t.source_id, "captions": captions})
        splits_out = [(split, caps)]
        if split == "val":  # FashionIQ's test split: the same queries, no answers
            splits_out.append(("test", {c: [{k: v for k, v in e.items() if k != "target"} for e in rows]
                                        for c, rows in caps.items()}))
        for name, rows_by_cat in splits_out:
            for cat, rows in rows_by_cat.items():
                (root / "captions" / f"cap.{cat}.{name}.json").write_text(json.dumps(rows))
                (root / "image_splits" / f"split.{cat}.{name}.json").write_text(json.dumps(by_cat[cat]))
                counts.setdefault(cat, {})[name] = {"triplets": len(rows), "images": len(by_cat[cat])}
    return counts


def write_fashionmv_layout(root: str | Path, data: SyntheticData) -> dict[str, Any]:
    """``root/{split}_{triplets,captions}.jsonl`` and ``root/images/{dataset}/{id}/NN_view.jpg``, with
    nested product ids (``category/p000123``) as real FashionMV ids can be."""
    root = Path(root)
    counts: dict[str, Any] = {}

    def raw_id(pid: str) -> str:
        return f"{data.products[pid].attributes['category']}/{pid}"

    for split in ("train", "val"):
        captions = []
        for spec in data.split_products(split):
            product = spec.render(data.styles[spec.dataset].size)
            folder = root / "images" / spec.dataset / raw_id(spec.product_id)
            folder.mkdir(parents=True, exist_ok=True)
            for i, (img, view) in enumerate(zip(product.views, product.view_names, strict=True)):
                img.save(folder / f"{i:02d}_{view}.jpg", quality=92)
            captions.append({"product_id": raw_id(spec.product_id), "dataset": spec.dataset,
                             "category": product.category, "long_caption": product.long_caption,
                             "short_caption": product.short_caption, "image_captions": product.view_captions})
        triplets = [{"source_id": raw_id(t.source_id), "target_id": raw_id(t.target_id), "dataset": t.dataset,
                     "modification_text_short": t.modification_short, "modification_text_long": t.modification_long,
                     "views_involved": t.views_involved} for t in data.triplets[split]]
        (root / f"{split}_captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
        (root / f"{split}_triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in triplets))
        counts[split] = {"products": len(captions), "triplets": len(triplets)}
    return counts
