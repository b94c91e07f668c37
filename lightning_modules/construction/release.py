"""The pipeline's output: the FashionMV release layout plus ``build_summary.json``.

``{split}_captions.jsonl``, ``{split}_triplets.jsonl`` and ``images/{dataset}/{product_id}/`` (the
views the captions describe, in their order), so ``cir data fashionmv --root OUT`` converts it.
Files are rewritten whole from the journals, sorted, through a temporary file and a rename: a
resumed build writes the same bytes as an uninterrupted one, and a kill never leaves half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from datamodules.atomic import write_text_atomic
from datamodules.catalogue import SPLITS, CatalogueProduct

from .answers import words


def write_atomic(path: Path, text: str) -> None:
    """One writer (``cir build``) per output folder: a killed run's temporary files are cleared."""
    write_text_atomic(path, text, remove_stale=True)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def place_images(product: CatalogueProduct, root: Path) -> None:
    """Hard links where the file system allows, copies elsewhere; a file of the right size is kept."""
    folder = root / "images" / product.dataset / product.product_id
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {v.name for v in product.views}
    for stale in folder.iterdir():  # the converter lists the folder: only the captioned views may be there
        if stale.is_file() and stale.name not in wanted:
            stale.unlink()
    for view in product.views:
        dest = folder / view.name
        if dest.is_file() and dest.stat().st_size == view.stat().st_size:
            continue
        tmp = folder / f".{view.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(view, tmp)
        except OSError:
            shutil.copyfile(view, tmp)
        os.replace(tmp, dest)


def view_combination(views: list[str]) -> str:
    return " + ".join(sorted(set(views)))


def write_release(out: Path, products: dict[str, CatalogueProduct], split_of: dict[str, str],
                  captions: dict[str, dict[str, Any]], triplets: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Writes the layout for the ``captions`` products (the retained ones) and returns the tables."""
    stats: dict[str, Any] = {"products": {}, "triplets": {}}
    for split in SPLITS:
        rows = []
        for pid in sorted(p for p in captions if split_of[p] == split):
            p = products[pid]
            place_images(p, out)
            meta = {k: v for k, v in p.meta().items() if k != "split" and v}
            rows.append({**meta, "views": [v.name for v in p.views],
                         **{k: captions[pid][k] for k in ("image_captions", "long_caption", "short_caption")}})
        write_atomic(out / f"{split}_captions.jsonl", _jsonl(rows))
        trows = [{"source_id": src, "target_id": sel["target_id"], "dataset": products[src].dataset,
                  "modification_text_short": sel["modification_text_short"],
                  "modification_text_long": sel["modification_text_long"], "views_involved": sel["views_involved"]}
                 for src in sorted(s for s in triplets if split_of[s] == split) for sel in triplets[src]]
        write_atomic(out / f"{split}_triplets.jsonl", _jsonl(trows))
        stats["products"][split], stats["triplets"][split] = len(rows), len(trows)
    combos = Counter(view_combination(sel["views_involved"]) for sels in triplets.values() for sel in sels)
    total = sum(combos.values())
    stats["view_combinations"] = [{"views": k, "count": n, "percent": round(100 * n / total, 1)}
                                  for k, n in sorted(combos.items(), key=lambda kv: (-kv[1], kv[0]))]
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for pid, c in captions.items():
        per = counts[products[pid].dataset]
        per["per_image"] += [words(t) for t in c["image_captions"]]
        per["long_caption"].append(words(c["long_caption"]))
        per["short_caption"].append(words(c["short_caption"]))
    stats["caption_words"] = {ds: {k: round(sum(v) / len(v), 1) for k, v in per.items()}
                              for ds, per in sorted(counts.items())}
    return stats
