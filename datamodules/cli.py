"""``cir-data``: create shard folders (the generated dataset now; dataset converters plug in here)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _synthetic(args: argparse.Namespace) -> None:
    from .synthetic import write_synthetic

    splits = write_synthetic(args.out, products=args.products, seed=args.seed, val_fraction=args.val_fraction,
                             maxcount=args.maxcount)
    print(json.dumps({s: {k: v for k, v in d.items() if k != "shards"} for s, d in splits.items()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cir-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="generate the procedural multi-view fashion dataset as shards")
    syn.add_argument("--out", required=True, help="output folder (manifest.json + shards)")
    syn.add_argument("--products", type=int, default=1500)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--val-fraction", type=float, default=0.2)
    syn.add_argument("--maxcount", type=int, default=256, help="samples per shard")
    syn.set_defaults(func=_synthetic)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.func(args)


if __name__ == "__main__":
    main()
