"""``cir search``: build a saved faiss index of a gallery with a trained model, and query it.

    cir search build --config experiments/demos/clip4cir.yaml --ckpt outputs/clip4cir_demo/checkpoints/last.ckpt \\
        --out index/ [--kind ivf]
    cir search query --index index/ --config experiments/demos/clip4cir.yaml \\
        --ckpt outputs/clip4cir_demo/checkpoints/last.ckpt --images front.jpg back.jpg \\
        --text "make it red with an open back" [--dataset synth_studio] [-k 10]

Options after ``--`` are passed to the config (e.g. ``-- --data.init_args.data_dir=data/fashionmv``).
Both need ``--ckpt`` (or ``--untrained`` for the experiment's initial weights). The index records the
fingerprint of the model that built it (class, config hash, checkpoint hash, preprocessing,
normalisation); a query from a model with another fingerprint is refused, naming what differs.
A query sees the products ``cir serve`` added or removed since the index was built: the folder's
``changes.log`` is replayed read-only (nothing is written; a record being appended is not read).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_modules.core.embedding import place
from lightning_modules.retrieval import GalleryIndex
from lightning_modules.retrieval.mutable import LOG, MutableGallery, is_multi_vector

from .args import (
    add_index_options,
    add_query_knobs,
    add_weights_options,
    command_parser,
    configure_index,
    index_build_options,
    parse,
)
from .errors import check_files, check_images, one_line, user_errors
from .models import (
    REBUILD,
    encode_gallery,
    encode_query,
    fingerprint_mismatch,
    load_with_fingerprint,
    require_weights,
    resolve_device_or_exit,
)
from .progress import Progress


def choose_dataset(available: Sequence[str], wanted: str | None, prog: str) -> str:
    """The dataset whose gallery a query searches: ``--dataset``, or the only one there is."""
    available = sorted(set(available))
    if wanted is None:
        if len(available) == 1:
            return available[0]
        raise SystemExit(f"{prog}: the gallery holds datasets {available}: choose one with --dataset")
    if wanted not in available:
        raise SystemExit(f"{prog}: --dataset {wanted}: not in the gallery, which holds {available}")
    return wanted


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("search", __doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,query}")
    about = {
        "build": ("embed a split's gallery with a trained model and save it as a faiss index",
                  "Embed the gallery of --split with the trained model (--config, --ckpt) and save a faiss\n"
                  "index of it in --out, with the model's fingerprint; cir search query and cir serve --index\n"
                  "read it."),
        "query": ("search a saved index with source views and a modification text",
                  "Embed one query (the source product's --images and the modification --text) with the\n"
                  "model that built --index, and print the k best products of one dataset's gallery with\n"
                  "their scores."),
    }
    for name, (summary, description) in about.items():
        p = sub.add_parser(name, help=summary, description=description)
        add_weights_options(p, "use")
        p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available) for the model")
    b = sub.choices["build"]
    b.add_argument("--out", required=True, help="folder the index is written to (gallery_index.json and the faiss "
                   "files)")
    b.add_argument("--split", default="val", help="the split whose gallery is indexed")
    add_index_options(b)
    q = sub.choices["query"]
    q.add_argument("--index", required=True, help="a folder written by cir search build")
    q.add_argument("--images", nargs="+", required=True, help="views of the source product")
    q.add_argument("--text", required=True, help="the modification text")
    q.add_argument("--dataset", default=None, help="the gallery searched (needed when the index holds several)")
    q.add_argument("-k", type=int, default=10, help="how many products to print")
    add_query_knobs(q)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parse(parser, argv, passthrough=True)
    prog = f"cir search {args.command}"
    with user_errors(prog):
        _main(prog, args, extra)


def _main(prog: str, args: Any, extra: list[str]) -> None:
    require_weights(prog, args.ckpt, args.untrained)
    check_files(prog, [("--config", c) for c in args.config])
    if args.command == "query":
        check_images(prog, args.images)  # before the model: it takes seconds to minutes to load
        index = GalleryIndex.load(args.index)
        store = _with_changes(prog, index, args)
        dataset = choose_dataset(store.datasets(), args.dataset, prog)
        if index.fingerprint is None:  # nothing to compare with: refused before the model is built
            raise SystemExit(f"{prog}: {fingerprint_mismatch(None, {}, f'--index {args.index}', REBUILD)}")
    device = resolve_device_or_exit(prog, args.device)
    model, dm, fingerprint = load_with_fingerprint(args.config, args.ckpt, extra)
    place(model, device)
    if args.command == "build":
        emb, ids, datasets = encode_gallery(model, dm, args.split)
        try:
            with Progress(prog, f"indexing ({args.kind})", len(emb) if emb.ndim == 2 else None, "vector") as bar:
                index = GalleryIndex.build(emb, ids, datasets, kind=args.kind, fingerprint=fingerprint,
                                           **index_build_options(args), progress=bar)
            configure_index(index, args)
        except ValueError as exc:  # a factory string faiss refuses, too few vectors to train it, ...
            raise SystemExit(f"{prog}: {one_line(exc)}") from None
        index.save(args.out)
        print(f"indexed {len(ids)} products of {sorted(set(datasets))} ({args.kind}) in {Path(args.out)}")
        return
    if problem := fingerprint_mismatch(index.fingerprint, fingerprint, f"--index {args.index}", REBUILD):
        raise SystemExit(f"{prog}: {problem}")
    try:
        query = encode_query(model, dm, args.images, args.text)
        results = (index.search(query, args.k, dataset=dataset, nprobe=args.nprobe, ef_search=args.ef_search,
                                rerank=args.rerank) if store is index else store.search(query, args.k, dataset))[0]
    except ValueError as exc:  # a knob this index has not (nprobe on HNSW, rerank without stored vectors)
        raise SystemExit(f"{prog}: {one_line(exc)}") from None
    print(f"{'rank':>4}  {'score':>7}  product")
    for rank, (pid, score) in enumerate(results, 1):
        print(f"{rank:>4}  {score:>7.4f}  {pid}")



def _with_changes(prog: str, index: GalleryIndex, args: Any) -> GalleryIndex | MutableGallery:
    """The index as ``cir serve`` sees it now: with its change log replayed, when it has one."""
    if not (Path(args.index) / LOG).is_file():
        return index
    if is_multi_vector(index):  # served writes need one vector per product: such a log cannot exist
        return index
    try:  # the knobs become the base's defaults: the change overlay searches the base with them
        index.configure(nprobe=args.nprobe, ef_search=args.ef_search, rerank=args.rerank)
        store = MutableGallery.open(args.index, base=index, read_only=True)
    except ValueError as exc:
        raise SystemExit(f"{prog}: {one_line(exc)}") from None
    for note in store.notes:
        print(f"{prog}: {note}")
    if store.pending:
        print(f"{prog}: {store.pending} change(s) from {Path(args.index) / LOG} applied")
    return store
