"""FashionMV (product-level, multi-view CIR) → shards.

Reads the release's layout, annotations and images apart::

    DATA_DIR/{split}_triplets.jsonl   source_id, target_id, dataset, modification_text_short,
                                      [modification_text_long], [views_involved]
    DATA_DIR/{split}_captions.jsonl   product_id, dataset, long_caption, short_caption, [image_captions]
                                      (optional; per-image captions optional too)
    IMAGE_ROOT/{dataset}/{product_id}/*.{jpg,jpeg,png,webp}   views, sorted by file name, at most 5

``root`` is the shorthand for both: ``DATA_DIR`` = ``ROOT/data`` when it holds the triplets (the
release) else ``ROOT``, and ``IMAGE_ROOT`` = ``ROOT/images``. Views are taken as the official
evaluator takes them (top-level files of the product folder, sorted by name as strings, the first
5) and stored as their original bytes, so the model sees the evaluator's pixels.

Product ids may be nested paths; shard keys use ``safe_key(id)`` and keep the original as
``raw_id``. The gallery of a dataset is the union of the source and target products of its
triplets in that split (the paper's protocol). Missing products and unreadable images are
skipped and counted in ``summary.json``; a conversion that would write no triplet at all (no
triplet files, empty ones, or no triplet with both products' images) is an error naming why and
the option the user gave (``--root``, or ``--data-dir``/``--image-root``), before a shard is written.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..interfaces import ProgressSink
from ..schema import MAX_VIEWS, Triplet, check_key, safe_key
from ..shards import ShardSetWriter, write_manifest
from .common import IMAGE_SUFFIXES, load_image_bytes, read_jsonl, write_summary

SPLITS = ("train", "val")
_PER_IMAGE_KEYS = ("image_captions", "per_image_captions", "view_captions")


def _view_files(folder: Path, max_views: int) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_views]


def _per_image_captions(row: dict[str, Any], files: list[Path]) -> list[str]:
    """One caption per view file: the row's per-image captions where it has them, else empty."""
    for key in _PER_IMAGE_KEYS:
        value = row.get(key)
        if isinstance(value, dict):  # keyed by file name
            return [str(value.get(f.name, value.get(f.stem, ""))) for f in files]
        if isinstance(value, list):
            return [str(v) for v in value[: len(files)]] + [""] * max(0, len(files) - len(value))
    return [""] * len(files)


def resolve_layout(root: str | Path | None, data_dir: str | Path | None,
                   image_root: str | Path | None, splits: Sequence[str]) -> tuple[Path, Path]:
    """(annotation folder, image folder) from ``--root`` and/or ``--data-dir``/``--image-root``."""
    if root is None and (data_dir is None or image_root is None):
        raise ValueError("FashionMV: give --root, or both --data-dir (the *_triplets.jsonl files) and --image-root "
                         "(the folder of deepfashion/, f200k/, fashiongen_val/ ...)")
    given_data_dir, given_image_root = data_dir is not None, image_root is not None
    if root is not None:
        root = Path(root)
        if data_dir is None:
            release = root / "data"
            data_dir = release if any((release / f"{s}_triplets.jsonl").is_file() for s in splits) else root
        image_root = image_root if image_root is not None else root / "images"
    data_dir, image_root = Path(data_dir), Path(image_root)
    missing = [f"{s}_triplets.jsonl" for s in splits if not (data_dir / f"{s}_triplets.jsonl").is_file()]
    if missing:
        found = [f"{s}_triplets.jsonl" for s in splits if f"{s}_triplets.jsonl" not in missing]
        also = (f" (it has {', '.join(found)}: pass --splits {' '.join(n.split('_')[0] for n in found)} to convert "
                "only those)" if found else "")
        # Name only the option the user gave: the --root layouts mean nothing to a --data-dir user.
        if given_data_dir:
            nested = data_dir / "data"
            hint = (f"; {nested} has them: pass --data-dir {nested}"
                    if (nested / missing[0]).is_file() else "")
            raise FileNotFoundError(f"FashionMV: --data-dir {data_dir} has no {', '.join(missing)}{also}; --data-dir "
                                    "is the folder that holds {split}_triplets.jsonl (and optionally "
                                    f"{{split}}_captions.jsonl) itself{hint}")
        raise FileNotFoundError(f"FashionMV: --root {root} has no {', '.join(missing)} in {root / 'data'}/ or "
                                f"{root}/{also}; --root accepts the release's layout, "
                                "ROOT/data/{split}_triplets.jsonl (or ROOT/{split}_triplets.jsonl) with the images "
                                "in ROOT/images/<dataset>/<product_id>/")
    if not image_root.is_dir():
        flag = f"--image-root {image_root}" if given_image_root else f"--root {root}: {image_root}"
        raise FileNotFoundError(f"FashionMV: {flag} is not a folder; it must hold one folder per dataset "
                                "(deepfashion/, f200k/, fashiongen_val/ ...) of <product_id>/*.jpg")
    return data_dir, image_root


def _check_something_to_convert(triplets: dict[str, list[dict[str, Any]]], data_dir: Path, image_root: Path,
                                image_flag: str, max_views: int) -> None:
    """Refuses, before a shard is written, a conversion whose every split would be empty: an empty
    shard folder would only fail later, in training, far from its cause."""
    files = ", ".join(f"{split}_triplets.jsonl" for split in triplets)
    if not any(triplets.values()):
        raise ValueError(f"FashionMV: {files} in {data_dir} hold no triplets; nothing to convert")

    def has_views(t: dict[str, Any]) -> bool:
        folder = image_root / str(t["dataset"])
        return all(_view_files(folder / str(t[k]), max_views) for k in ("source_id", "target_id"))

    # any() stops at the first usable triplet: on a good copy this costs one or two folder listings.
    if not any(has_views(t) for rows in triplets.values() for t in rows):
        first = next(t for rows in triplets.values() for t in rows)
        raise ValueError(f"FashionMV: none of the {sum(map(len, triplets.values()))} triplets in {files} has "
                         f"image files for both products under {image_root}/<dataset>/<product_id>/ (e.g. "
                         f"{image_root / str(first['dataset']) / str(first['source_id'])}); check {image_flag}")


def convert_fashionmv(root: str | Path | None, out: str | Path, splits: Sequence[str] = SPLITS, maxcount: int = 500,
                      max_views: int = MAX_VIEWS, max_side: int | None = None, data_dir: str | Path | None = None,
                      image_root: str | Path | None = None, order_seed: int = 0,
                      progress: ProgressSink | None = None) -> dict[str, Any]:
    """Write shards + ``manifest.json`` + ``summary.json``; returns the summary. Each split's triplets
    are written in a random order seeded by ``order_seed`` (the release lists them source by source),
    so neighbouring records are not one product's triplets. ``progress`` counts products and triplets."""
    image_flag = "--image-root" if image_root is not None else "--root (its images/ folder)"
    data_dir, image_root = resolve_layout(root, data_dir, image_root, splits)
    out = Path(out)
    summary: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    manifest_splits: dict[str, dict[str, Any]] = {}
    datasets: set[str] = set()
    all_triplets = {split: read_jsonl(data_dir / f"{split}_triplets.jsonl") for split in splits}
    for split, triplets in all_triplets.items():
        for n, t in enumerate(triplets):
            missing = [k for k in ("source_id", "target_id", "dataset", "modification_text_short") if k not in t]
            if missing:
                raise ValueError(f"{data_dir / f'{split}_triplets.jsonl'} line {n + 1}: missing fields {missing}")
    _check_something_to_convert(all_triplets, data_dir, image_root, image_flag, max_views)
    for split in splits:
        triplets = all_triplets[split]
        caption_file = data_dir / f"{split}_captions.jsonl"
        caption_rows = read_jsonl(caption_file) if caption_file.is_file() else []
        captions = {(r.get("dataset", ""), str(r["product_id"])): r for r in caption_rows if "product_id" in r}
        # Rows without a dataset field still match their product by id.
        captions_by_id = {str(r["product_id"]): r for r in caption_rows if "product_id" in r and "dataset" not in r}
        writer = ShardSetWriter(out, split, maxcount=maxcount)
        counts: dict[str, dict[str, int]] = defaultdict(lambda: {
            "triplets_written": 0, "triplets_skipped": 0, "products_written": 0, "products_missing": 0})
        needed: dict[str, list[str]] = defaultdict(list)
        for t in triplets:
            for pid in (str(t["source_id"]), str(t["target_id"])):
                if pid not in needed[t["dataset"]]:
                    needed[t["dataset"]].append(pid)
        products: dict[tuple[str, str], tuple[dict[str, Any], list[bytes]]] = {}
        if progress is not None:
            progress.expect(sum(len(ids) for ids in needed.values()) + len(triplets))
        for dataset, ids in sorted(needed.items()):
            check_key(dataset, "FashionMV dataset name")
            datasets.add(dataset)
            seen_keys: dict[str, str] = {}
            for pid in ids:
                key = safe_key(pid)
                if seen_keys.setdefault(key, pid) != pid:
                    raise ValueError(f"FashionMV {dataset}: product ids {seen_keys[key]!r} and {pid!r} map to the "
                                     f"same shard key {key!r}; rename one of them")
                if progress is not None:
                    progress.update(1)
                listed = _view_files(image_root / dataset / pid, max_views)
                loaded = [(f, load_image_bytes(f, max_side)) for f in listed]
                files = [f for f, b in loaded if b is not None]  # an unreadable view is dropped, not the product
                views = [b for _, b in loaded if b is not None]
                if not views:
                    counts[dataset]["products_missing"] += 1
                    continue
                row = captions.get((dataset, pid)) or captions_by_id.get(pid, {})
                captions_all = _per_image_captions(row, listed)
                view_captions = [c for (_, b), c in zip(loaded, captions_all, strict=True) if b is not None]
                meta = {"product_id": key, "dataset": dataset, "category": str(row.get("category", "")),
                        "view_names": [f.stem for f in files], "raw_id": pid,
                        "short_caption": row.get("short_caption", ""), "long_caption": row.get("long_caption", ""),
                        "view_captions": view_captions, "attributes": {}}
                products[(dataset, pid)] = (meta, views)
                writer.write_product(meta, views)
                counts[dataset]["products_written"] += 1
        ordered = list(triplets)
        random.Random(f"{order_seed}|{split}").shuffle(ordered)
        for t in ordered:
            if progress is not None:
                progress.update(1)
            dataset, src, tgt = t["dataset"], str(t["source_id"]), str(t["target_id"])
            if (dataset, src) not in products or (dataset, tgt) not in products:
                counts[dataset]["triplets_skipped"] += 1
                continue
            triplet = Triplet(safe_key(src), safe_key(tgt), dataset, modification_short=t["modification_text_short"],
                              modification_long=t.get("modification_text_long") or "",
                              views_involved=list(t.get("views_involved") or []))
            writer.write_triplet(triplet, products[(dataset, src)], products[(dataset, tgt)])
            counts[dataset]["triplets_written"] += 1
        for dataset, c in counts.items():
            summary[dataset][split] = c
        manifest_splits[split] = writer.close()
    written = sum(c["triplets_written"] for per in summary.values() for c in per.values())
    if not written:
        # Image files were there but none decoded: no manifest, so no datamodule mistakes it for data.
        missing = sum(c["products_missing"] for per in summary.values() for c in per.values())
        raise ValueError(f"FashionMV: no triplet written: {missing} products have no readable image under "
                         f"{image_root}/<dataset>/<product_id>/ (the log names the unreadable files); "
                         f"check {image_flag}")
    write_manifest(out, manifest_splits, datasets, {"converter": "fashionmv", "data_dir": str(data_dir),
                                                    "image_root": str(image_root)})
    summary = {k: dict(v) for k, v in summary.items()}
    write_summary(out, summary)
    return summary
