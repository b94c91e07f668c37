"""``cir data``: create shard folders from the generator or from the real datasets' own layouts.

    cir data synthetic --out data/synthetic [--products 1500 --seed 0]
    cir data synthetic --out data/fiq-layout --layout fashioniq     # generated data, FashionIQ's layout
    cir data synthetic --out data/catalogue --layout catalogue --products 300   # the input of `cir build`
    cir data fashioniq --root FASHIONIQ --out data/fashioniq [--categories dress shirt toptee]
    cir data fashionmv --root FASHIONMV --out data/fashionmv     # the release: ROOT/data/*.jsonl, ROOT/images/
    cir data fashionmv --data-dir FASHIONMV/data --image-root /images/elsewhere --out data/fashionmv
    cir data fashiongen-h5 --h5 fashiongen_256_256_validation.h5 --root FASHIONMV   # → FASHIONMV/images/fashiongen_val/
    cir data sessions data/fashioniq [--min-turns 2 --max-turns 5 --seed 0]   # multi-turn sessions from the triplets
    cir data fashioniq --root FASHIONIQ --out data/fashioniq --sessions          # the same, right after converting
    cir data synthetic --out data/synthetic --sessions 200    # + generated sessions, each turn a new attribute

A conversion that would write no triplet (missing or empty triplet files, no product with images)
stops with one line naming why and the option to fix, and writes no manifest.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from datamodules.converters import convert_fashioniq, convert_fashionmv, extract_fashiongen_h5
from datamodules.converters.chaining import chain_folder, chain_table
from datamodules.converters.fashionmv import resolve_layout
from datamodules.converters.release_sessions import given_sessions
from datamodules.synthetic import generate, write_synthetic
from datamodules.synthetic.catalogue import write_catalogue_layout
from datamodules.synthetic.layouts import write_fashioniq_layout, write_fashionmv_layout
from datamodules.synthetic.sessions import session_count

from .args import command_parser, parse
from .errors import debug_requested
from .progress import Progress


def _synthetic(args: argparse.Namespace) -> None:
    sessions = session_count(args.sessions, args.products)
    if sessions and args.layout != "shards":
        raise SystemExit(f"cir data synthetic: --sessions writes session shards, not the {args.layout} layout; drop "
                         "it, or chain the converted layout (`cir data fashioniq ... --sessions`)")
    if args.layout == "shards":
        splits = write_synthetic(args.out, products=args.products, seed=args.seed, val_fraction=args.val_fraction,
                                 maxcount=args.maxcount, sessions=sessions,
                                 session_turns=(args.min_turns, args.max_turns))
        print(json.dumps({s: {k: v for k, v in d.items() if k != "shards"} for s, d in splits.items()}, indent=2))
        return
    data = generate(args.products, seed=args.seed, val_fraction=args.val_fraction)
    if args.layout == "catalogue":
        print(json.dumps(write_catalogue_layout(args.out, data, seed=args.seed), indent=2))
        return
    writer = write_fashioniq_layout if args.layout == "fashioniq" else write_fashionmv_layout
    print(json.dumps(writer(args.out, data), indent=2))


def _chain(folder: str, args: argparse.Namespace, given: dict | None = None) -> None:
    with Progress("cir data sessions", "reading", None, "sample") as progress:
        reports = chain_folder(folder, min_turns=args.min_turns, max_turns=args.max_turns, seed=args.session_seed,
                               maxcount=args.maxcount, given=given, progress=progress)
    print(chain_table(reports, args.min_turns, args.max_turns))
    dropped = {s: r["dropped"] for s, r in reports.items() if r["dropped"]}
    if dropped:
        print(f"cir data: {dropped} of the release's sessions dropped (a turn's product has no readable image)")


def _sessions(args: argparse.Namespace) -> None:
    _chain(args.dir, args)


def _fashioniq(args: argparse.Namespace) -> None:
    with Progress("cir data fashioniq", "converting", None, "record") as progress:
        convert_fashioniq(args.root, args.out, categories=args.categories, splits=args.splits,
                          maxcount=args.maxcount, max_side=args.max_side, progress=progress)
    if args.sessions:
        _chain(args.out, args)


def _fashionmv(args: argparse.Namespace) -> None:
    if args.root is None and (args.data_dir is None or args.image_root is None):
        raise SystemExit("cir data fashionmv: give --root, or both --data-dir and --image-root")
    with Progress("cir data fashionmv", "converting", None, "record") as progress:
        convert_fashionmv(args.root, args.out, splits=args.splits, maxcount=args.maxcount, max_side=args.max_side,
                          data_dir=args.data_dir, image_root=args.image_root, progress=progress)
    if args.sessions:  # a release with {split}_sessions.jsonl (`cir build --chain`) keeps its own sessions
        data_dir, _ = resolve_layout(args.root, args.data_dir, args.image_root, args.splits)
        given = {s: g for s in args.splits if (g := given_sessions(data_dir, s)) is not None}
        _chain(args.out, args, given)


def _fashiongen(args: argparse.Namespace) -> None:
    if (args.root is None) == (args.image_root is None):
        raise SystemExit("cir data fashiongen-h5: give --root (images go to ROOT/images/DATASET/) or --image-root")
    image_root = args.image_root or str(Path(args.root) / "images")
    print(json.dumps(extract_fashiongen_h5(args.h5, image_root, dataset=args.dataset), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("data", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, about: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=about, description=about)

    syn = command("synthetic", "generate the procedural multi-view fashion dataset")
    syn.add_argument("--out", required=True, help="output folder")
    syn.add_argument("--products", type=int, default=1500, help="products to generate (train and val)")
    syn.add_argument("--seed", type=int, default=0, help="seed of the generator (the same seed, the same data)")
    syn.add_argument("--val-fraction", type=float, default=0.2, help="share of the products held out for val")
    syn.add_argument("--maxcount", type=int, default=256, help="samples per shard")
    syn.add_argument("--layout", choices=["shards", "fashioniq", "fashionmv", "catalogue"], default="shards",
                     help="shards (ready to train), a real dataset's own layout (input of its converter), or a "
                     "retailer's catalogue of photos (input of `cir build`; ground_truth.jsonl feeds its oracle)")
    syn.add_argument("--sessions", type=float, default=0, help="multi-turn sessions written beside the triplets "
                     "(train and val as --val-fraction), or a share of --products below 1; each turn changes new "
                     "attributes, some only visible from the back or side")
    syn.add_argument("--min-turns", type=int, default=2, help="fewest turns of a generated session (2-5)")
    syn.add_argument("--max-turns", type=int, default=5, help="most turns of a generated session (2-5)")
    syn.set_defaults(func=_synthetic)

    fiq = command("fashioniq", "convert FashionIQ (captions/, image_splits/, images/) to shards")
    fiq.add_argument("--root", required=True, help="FashionIQ's folder (captions/, image_splits/, images/)")
    fiq.add_argument("--out", required=True, help="output shard folder")
    fiq.add_argument("--categories", nargs="+", default=["dress", "shirt", "toptee"],
                     help="categories converted, each its own dataset (fashioniq_<category>)")
    fiq.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="splits converted")
    fiq.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    fiq.add_argument("--max-side", type=int, default=None, help="downscale images larger than this")
    _session_options(fiq, flag=True)
    fiq.set_defaults(func=_fashioniq)

    fmv = command("fashionmv", "convert FashionMV (*_triplets.jsonl, *_captions.jsonl, images/)")
    fmv.add_argument("--root", default=None, help="the release's folder: ROOT/data/*.jsonl (or ROOT/*.jsonl) and "
                     "ROOT/images/; shorthand for --data-dir and --image-root")
    fmv.add_argument("--data-dir", default=None, help="folder of {split}_triplets.jsonl and {split}_captions.jsonl")
    fmv.add_argument("--image-root", default=None, help="folder of one subfolder per dataset (deepfashion/, ...)")
    fmv.add_argument("--out", required=True, help="output shard folder")
    fmv.add_argument("--splits", nargs="+", default=["train", "val"], help="splits converted")
    fmv.add_argument("--maxcount", type=int, default=500, help="samples per shard")
    fmv.add_argument("--max-side", type=int, default=None, help="downscale images larger than this")
    _session_options(fmv, flag=True)
    fmv.set_defaults(func=_fashionmv)

    fg = command("fashiongen-h5", "extract FashionGen images from its h5 file into FashionMV's layout")
    fg.add_argument("--h5", required=True, help="FashionGen's h5 file (e.g. fashiongen_256_256_validation.h5)")
    fg.add_argument("--root", default=None, help="FashionMV root; images go to ROOT/images/DATASET/ID/ROW.jpg")
    fg.add_argument("--image-root", default=None, help="images go to IMAGE_ROOT/DATASET/ID/ROW.jpg")
    fg.add_argument("--dataset", default="fashiongen_val", help="dataset folder the images go to")
    fg.set_defaults(func=_fashiongen)

    ses = command("sessions", "chain a shard folder's triplets into multi-turn sessions (replacing earlier ones)")
    ses.add_argument("dir", help="shard folder (manifest.json); its sessions and manifest are rewritten in place")
    ses.add_argument("--maxcount", type=int, default=500, help="sessions per shard")
    _session_options(ses, flag=False)
    ses.set_defaults(func=_sessions)
    return parser


def _session_options(parser: argparse.ArgumentParser, flag: bool) -> None:
    if flag:
        parser.add_argument("--sessions", action="store_true",
                            help="then chain the triplets into multi-turn sessions (as `cir data sessions OUT`; a "
                            "release's own {split}_sessions.jsonl, from `cir build --chain`, are kept as they are)")
    parser.add_argument("--min-turns", type=int, default=2, help="fewest turns of a session")
    parser.add_argument("--max-turns", type=int, default=5, help="most turns of a session")
    parser.add_argument("--session-seed" if flag else "--seed", dest="session_seed", metavar="SEED", type=int,
                        default=0, help="seed of the session sampling (the same seed, the same sessions)")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, _ = parse(build_parser(), argv)
    try:
        args.func(args)
    except (ValueError, OSError) as exc:  # a wrong folder, an empty or broken input: one line naming it
        if debug_requested():
            raise
        raise SystemExit(f"cir data {args.command}: {exc} (CIR_DEBUG=1 shows the traceback)") from exc

