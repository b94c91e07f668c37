"""The procedural multi-view fashion dataset, the embedded default for demos and tests."""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..session_shards import write_session
from ..shards import ShardSetWriter, encode_product, write_manifest
from .generate import DEFAULT_STYLES, DatasetStyle, Group, ProductSpec, SyntheticData, generate
from .sessions import add_sessions

# Bump when a change to the generator changes its output for the same seed: DataModules then refuse
# folders written by an older generator instead of silently training on different data.
# 3: captions describe only what the product's views show.
# 4: CIRR-style groups of near-duplicates (two sources and their candidates, differing only in the
#    changed attributes; each triplet carries the rest of its group as ``subset_ids``), pairs of groups
#    with the same changes on other bases (text twins), and a share of view-incomplete triplets
#    (``view_incomplete``). See generate.py.
# 5: triplets written in a seeded random order over the whole split, not group by group (a reader
#    that takes neighbouring records, like a shuffle buffer, then draws from the whole split).
GENERATOR_VERSION = 5

__all__ = ["DEFAULT_STYLES", "GENERATOR_VERSION", "DatasetStyle", "Group", "ProductSpec", "SyntheticData",
           "generate", "write_synthetic"]


def write_synthetic(out_dir: str | Path, products: int = 1500, seed: int = 0, val_fraction: float = 0.2,
                    maxcount: int = 256, styles: dict[str, DatasetStyle] | None = None,
                    view_incomplete_share: float = 0.3, sessions: int = 0,
                    session_turns: tuple[int, int] = (2, 5)) -> dict[str, Any]:
    """Generate the dataset and write it as shards plus a manifest; returns the manifest's splits.
    ``styles``: sub-datasets other than the default two (view counts, resolutions), recorded in the
    manifest's source. ``view_incomplete_share``: see ``generate``. ``sessions``: multi-turn sessions
    of ``session_turns`` turns written beside the triplets (``synthetic.sessions.add_sessions``; their
    products join the galleries); 0 writes exactly what it always did."""
    start = time.perf_counter()
    data = generate(products, seed=seed, val_fraction=val_fraction, styles=styles,
                    view_incomplete_share=view_incomplete_share)
    chains = add_sessions(data, sessions, seed=seed, val_fraction=val_fraction, min_turns=session_turns[0],
                          max_turns=session_turns[1], view_incomplete_share=view_incomplete_share) if sessions else {}
    splits: dict[str, dict[str, Any]] = {}
    for split in ("train", "val"):
        writer = ShardSetWriter(out_dir, split, maxcount=maxcount)
        encoded = {}
        for product in data.render(split):
            encoded[product.product_id] = encode_product(product)
            writer.write_product(*encoded[product.product_id])
        triplets = list(data.triplets[split])
        random.Random(f"{seed}|{split}|write order").shuffle(triplets)
        for t in triplets:
            writer.write_triplet(t, encoded[t.source_id], encoded[t.target_id])
        for record in chains.get(split, []):
            write_session(writer, record, [encoded[pid] for pid in record.chain])
        splits[split] = writer.close()
    source = {"generator": "synthetic", "version": GENERATOR_VERSION, "products": products, "seed": seed,
              "val_fraction": val_fraction, "view_incomplete_share": view_incomplete_share,
              "seconds": round(time.perf_counter() - start, 2)}
    if sessions:
        source["sessions"] = {"count": sessions, "min_turns": session_turns[0], "max_turns": session_turns[1]}
    if styles is not None:
        source["styles"] = {name: asdict(style) for name, style in styles.items()}
    write_manifest(out_dir, splits, data.styles, source)
    return splits
