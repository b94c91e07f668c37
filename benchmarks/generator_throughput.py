"""Throughput of the procedural dataset generator on one core: products per minute.

    python benchmarks/generator_throughput.py [--products 2000]

Prints one row per stage: drawing the attribute families and triplets, rendering every view with
PIL (plus captions), and rendering + JPEG encoding + writing shards (what `cir data synthetic` does).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

    from datamodules.synthetic import generate, write_synthetic

    rows = []
    t = time.perf_counter()
    data = generate(args.products, seed=0)
    rows.append(("sample attributes + triplets", time.perf_counter() - t))
    t = time.perf_counter()
    views = sum(len(p.views) for split in ("train", "val") for p in data.render(split))
    rows.append((f"render {views} views + captions", time.perf_counter() - t))
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        write_synthetic(out, products=args.products, seed=0)
        rows.append(("render + encode + write shards", time.perf_counter() - t))

    print(f"{'stage':<36} {'seconds':>8} {'products/min':>13}")
    print("-" * 59)
    for name, sec in rows:
        print(f"{name:<36} {sec:>8.2f} {args.products / sec * 60:>13,.0f}")


if __name__ == "__main__":
    main()
