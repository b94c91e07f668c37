"""Padding in training batches with and without cost-aware batching (``data.init_args.bucket_batches``).

    python benchmarks/padding.py [--products 600] [--batch-size 32] [--buckets 0 4 8 16]

Generates data (the default generator: 2-5 views; and the same products drawn with 1-5 views),
runs one training epoch of ``ShardDataModule`` per setting and prints ``padding_fraction()``: the
padded share of view slots (tensor views, as CLIP/BLIP-2 batch them; the fraction does not depend
on the resolution, so views are resized to 16 px to keep the run short) or of patch positions
(Qwen patch grids from the tiny presets' image processors, each product padded to the longest of
its field in the batch). A second table replays the unbucketed epoch's sample costs through other
orders of a buffer, the evidence for the one ``datamodules/bucketing.py`` uses.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def write_data(out: Path, products: int, min_views: int | None) -> None:
    from datamodules.synthetic import DEFAULT_STYLES, DatasetStyle, write_synthetic

    styles = {name: DatasetStyle(s.size, min_views or s.min_views, 5 if min_views else s.max_views, s.front_prob)
              for name, s in DEFAULT_STYLES.items()}
    write_synthetic(out, products, seed=0, styles=styles)


def transforms() -> dict[str, Callable[[Any], Any] | None]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lightning_modules.backbones.qwen import QwenImageTransform, image_processor

    embedder = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2)
    embedder.size = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}
    return {"tensor views": None,
            "Qwen3.5 tiny patches (128²-512² px)": QwenImageTransform(image_processor(16, 2, 2)),
            "Qwen3-VL-Emb tiny patches (32²-128² px)": QwenImageTransform(embedder)}


def sample_costs(batch: dict[str, Any]) -> list[tuple[int, int]]:
    from datamodules.bucketing import views_cost

    def field(name: str) -> list[int]:
        value = batch[f"{name}_images"]
        if isinstance(value, torch.Tensor):
            return batch[f"{name}_mask"].sum(1).tolist()
        return [views_cost(v) for v in value]

    return list(zip(field("source"), field("target"), strict=True))


def replay(costs: list[tuple[int, int]], batch_size: int, bucket: int, key: str) -> float:
    """Padding fraction of consecutive buffers of ``costs`` ordered by ``key``."""
    from datamodules.bucketing import grid_order

    padded = total = 0
    size = bucket * batch_size
    for start in range(0, len(costs) - size + 1, size):
        buf = costs[start:start + size]
        keys: dict[str, Callable[[tuple[int, int]], Any]] = {
            "none": lambda c: 0, "sum": sum, "source": lambda c: c[0], "lexicographic": lambda c: c}
        order = (grid_order(buf, batch_size) if key == "grid" else
                 sorted(range(len(buf)), key=lambda i, b=buf: keys[key](b[i])))
        for b in range(0, size, batch_size):
            rows = [buf[i] for i in order[b:b + batch_size]]
            for f in (0, 1):
                longest = max(r[f] for r in rows)
                total += longest * len(rows)
                padded += longest * len(rows) - sum(r[f] for r in rows)
    return padded / total if total else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--buckets", type=int, nargs="+", default=[0, 4, 8, 16])
    args = parser.parse_args()
    torch.set_num_threads(1)

    from datamodules import ShardDataModule

    rows, replays = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for views, min_views in (("2-5 views", None), ("1-5 views", 1)):
            data = Path(tmp) / views
            write_data(data, args.products, min_views)
            for name, transform in transforms().items():
                fractions = []
                start = time.perf_counter()
                for bucket in args.buckets:
                    dm = ShardDataModule(str(data), batch_size=args.batch_size, num_workers=0, image_size=16,
                                         bucket_batches=bucket)
                    if transform is not None:
                        dm.set_image_transform(transform)
                    costs = []
                    for batch in dm.train_dataloader():
                        costs += sample_costs(dm.on_before_batch_transfer(batch, 0))
                    fractions.append(dm.padding_fraction())
                    if bucket == 0:
                        replays.append((views, name, {k: replay(costs, args.batch_size, 8, k) for k in
                                                      ("none", "sum", "source", "lexicographic", "grid")}))
                rows.append((views, name, fractions, time.perf_counter() - start))

    head = " ".join(f"{'bucket ' + str(b) if b else 'off':>10}" for b in args.buckets)
    print(f"padding fraction of one training epoch (batch {args.batch_size}, {args.products} products)")
    print(f"{'data':<10} {'views as':<40} {head}")
    for views, name, fractions, _ in rows:
        print(f"{views:<10} {name:<40} " + " ".join(f"{f:>10.3f}" for f in fractions))
    print(f"\nthe unbucketed epoch's samples replayed in buffers of 8 batches, by order (batch {args.batch_size})")
    keys = ("none", "sum", "source", "lexicographic", "grid")
    print(f"{'data':<10} {'views as':<40} " + " ".join(f"{k:>13}" for k in keys))
    for views, name, result in replays:
        print(f"{views:<10} {name:<40} " + " ".join(f"{result[k]:>13.3f}" for k in keys))


if __name__ == "__main__":
    main()
