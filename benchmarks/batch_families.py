"""How correlated training batches are: the in-batch share of same-group rows, by sampling.

    python benchmarks/batch_families.py [--data data/synthetic] [--batch-size 32] [--epochs 2]

On generated data every triplet stays inside its group of near-duplicates (``subset_ids`` plus the
source), so two rows of one batch from the same group are each other's near-duplicate negatives and
often share a target. For each sampling the table prints, over every training batch of ``--epochs``
epochs (one rank, the demo's 2 workers): the share of ordered row pairs (i ≠ j) of a batch from the
same group, the share of rows with at least one group mate in their batch, and the share of rows
whose target appears twice in the batch; beside them what a uniform shuffle of the whole split gives
(computed exactly from the group sizes, and for the target repeats by 200 random batches).
Data loading only (no model): a few seconds.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path
from typing import Any

from datamodules import ShardDataModule, SyntheticDataModule
from datamodules.sample_index import SampleIndex, SampleReader
from datamodules.shards import decode_sample


def group_of(triplet: dict[str, Any]) -> frozenset[str]:
    return frozenset([*(triplet.get("subset_ids") or []), triplet["source_id"]])


def batch_stats(groups: list[frozenset[str]], targets: list[str]) -> tuple[float, float, float]:
    n = len(groups)
    sizes = Counter(groups)
    pairs = sum(c * (c - 1) for c in sizes.values()) / (n * (n - 1))
    with_mate = sum(1 for g in groups if sizes[g] > 1) / n
    repeats = Counter(targets)
    return pairs, with_mate, sum(1 for t in targets if repeats[t] > 1) / n


def measure(dm: ShardDataModule, epochs: int) -> tuple[float, float, float, int]:
    loader = dm.train_dataloader()
    totals, count = [0.0, 0.0, 0.0], 0
    for epoch in range(epochs):
        loader.progress = lambda e=epoch: (e, 0, 1.0)
        for batch in loader:
            stats = batch_stats([group_of(m["triplet"]) for m in batch["meta"]],
                                [m["triplet"]["target_id"] for m in batch["meta"]])
            totals = [a + b for a, b in zip(totals, stats, strict=True)]
            count += 1
    return totals[0] / count, totals[1] / count, totals[2] / count, count


def uniform(triplets: list[dict[str, Any]], batch: int, draws: int = 200) -> tuple[float, float, float]:
    """Pair share exactly (sampling without replacement from the split); the other two by simulation."""
    n = len(triplets)
    sizes = Counter(group_of(t) for t in triplets)
    pairs = sum(c * (c - 1) for c in sizes.values()) / (n * (n - 1))
    rng = random.Random(0)
    mates = repeats = 0.0
    for _ in range(draws):
        rows = rng.sample(triplets, batch)
        _, m, r = batch_stats([group_of(t) for t in rows], [t["target_id"] for t in rows])
        mates, repeats = mates + m, repeats + r
    return pairs, mates / draws, repeats / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--products", type=int, default=1500, help="generated when --data does not exist yet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").is_file():
        SyntheticDataModule(args.data, products=args.products).prepare_data()
    reader = SampleReader(SampleIndex.load(args.data, "train"))
    triplets = [decode_sample(reader(i))["json"]["triplet"] for i in range(len(reader.index))]
    rows = [("uniform shuffle (reference)", *uniform(triplets, args.batch_size), 0)]
    for sampling in ("resampled", "permutation"):
        dm = ShardDataModule(args.data, batch_size=args.batch_size, num_workers=2, image_size=16,
                             sampling=sampling)  # type: ignore[arg-type]
        rows.append((sampling, *measure(dm, args.epochs)))
    print(f"{len(triplets)} training triplets in {len(Counter(group_of(t) for t in triplets))} groups, "
          f"batch {args.batch_size}")
    print("| sampling | same-group pairs | rows with a group mate | rows whose target repeats | batches |")
    print("|---|---|---|---|---|")
    for name, pairs, mates, repeats, count in rows:
        print(f"| {name} | {pairs:.4f} | {mates:.3f} | {repeats:.3f} | {count or '-'} |")


if __name__ == "__main__":
    main()
