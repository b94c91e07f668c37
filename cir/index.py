"""``cir index``: a catalogue of product photos, with no triplets, as a searchable gallery.

    cir index --config experiments/demos/clip4cir.yaml --ckpt outputs/clip4cir_demo/checkpoints/last.ckpt \\
        --catalogue data/shop --out index/shop [--kind hnsw] [--dataset shop]
    cir search query --index index/shop --config ... --ckpt ... --images front.jpg --text "in red"

Options after ``--`` go to the experiment's config. The experiment's data need not exist: only its
preprocessing is used. The catalogue is the layout ``cir build`` reads: ``images/<product_id>/*.jpg``
(a product's views, in name order, at most five) and an optional ``products.jsonl`` (``product_id``,
``dataset``, ``category``, ``title``). Every product with a readable view is embedded with the
trained model as its gallery item, its views read as evaluation reads a shard's (a phone photo's
EXIF orientation applied); unreadable views are skipped and counted, and products with none are
reported. The index records the model's fingerprint, so that ``cir search query`` refuses it to any
other model; a kill while it is written leaves the index that was there before.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from datamodules.atomic import write_text_atomic
from datamodules.batching import pad_views, stack_views
from datamodules.fast_decode import JPEG_MAGIC, open_view
from lightning_modules.backbones.images import open_upright, orientation
from lightning_modules.construction.catalogue import Catalogue, CatalogueProduct, read_catalogue
from lightning_modules.core import Products, Retriever
from lightning_modules.retrieval import GalleryIndex

from .args import add_weights_options, command_parser, parse
from .errors import _exit, check_files, one_line, user_errors
from .models import load_with_fingerprint, require_weights
from .progress import Progress

PROG = "cir index"
SUMMARY = "catalogue_summary.json"


def build_parser() -> Any:
    p = command_parser("index", __doc__)
    add_weights_options(p, "embed with")
    p.add_argument("--catalogue", required=True, help="folder of images/<product_id>/*.jpg [+ products.jsonl]")
    p.add_argument("--out", required=True, help="folder the index is written to (gallery_index.json, faiss files, "
                   f"{SUMMARY})")
    p.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat",
                   help="faiss index: exact (flat) or approximate (ivf, hnsw) for large catalogues")
    p.add_argument("--dataset", default="catalogue",
                   help="gallery name of products whose products.jsonl line names no dataset")
    p.add_argument("--batch-size", type=int, default=32, help="products embedded per forward pass")
    return p


def read_view(path: Path) -> Any:
    """A view as evaluation reads a shard's view (``open_view``: a colour JPEG decoded at the size
    the preprocessing needs, so a catalogue product and the same product in shards embed alike),
    unless its EXIF orientation asks for a turn: then decoded whole and turned upright, as ``cir
    build`` writes it and as ``cir serve`` reads an upload."""
    data = path.read_bytes()
    if data.startswith(JPEG_MAGIC):
        with Image.open(io.BytesIO(data)) as header:  # the header only: the orientation is in it
            turned = orientation(header) != 1
        if not turned:
            return open_view(data)
    return open_upright(io.BytesIO(data))


@torch.no_grad()
def embed_catalogue(model: Retriever, transform: Any, products: list[CatalogueProduct], batch_size: int = 32,
                    progress: bool = True) -> torch.Tensor:
    """One embedding per product, ``[N, D]``, from its views (``read_view``) preprocessed by
    ``transform`` (the model's own). A view that cannot be decoded any more (changed since the
    catalogue was read) ends the command naming it."""
    out = []
    bar = Progress(PROG, "embedding", len(products), "product") if progress else None
    for start in range(0, len(products), batch_size):
        chunk = products[start:start + batch_size]
        stacks = []
        for product in chunk:
            try:
                stacks.append(stack_views([read_view(v) for v in product.views], transform))
            except (OSError, ValueError) as exc:  # CorruptSample is a ValueError
                raise SystemExit(f"{PROG}: product {product.product_id!r}: {one_line(exc)}") from None
        images, mask = pad_views(stacks)
        emb = model.encode_target(Products(images, mask, None, [p.meta() for p in chunk])).float().cpu()
        if emb.ndim != 2:
            raise SystemExit(f"{PROG}: {type(model).__name__} embeds a product as {emb.shape[1]} vectors (a "
                             "multi-vector model: SPRC, or a maxsim view strategy); cir index holds one vector "
                             "per product: use a single-vector model or view strategy (joint, meanpool)")
        out.append(emb)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return torch.cat(out)


def _refuse_caption_targets(model: Any) -> None:
    # An item of such a model's gallery is its image and its caption; a catalogue has no captions,
    # so its embeddings would not be the ones evaluation measured.
    if getattr(model, "target_caption_weight", 0):
        raise SystemExit(f"{PROG}: {type(model).__name__} adds each product's caption to its embedding "
                         f"(target_caption_weight={model.target_caption_weight}) and a catalogue has none: "
                         "caption it first, or set model.init_args.target_caption_weight=0 after --")


def _write_summary(out: Path, catalogue: Catalogue, indexed: dict[str, int]) -> None:
    body = {"catalogue": dict(catalogue.counts), "indexed": indexed,
            "without_readable_view": catalogue.counts["no_readable_images"]}
    write_text_atomic(out / SUMMARY, json.dumps(body, indent=2))


def main(argv: list[str] | None = None) -> None:
    args, extra = parse(build_parser(), argv, passthrough=True)
    if args.batch_size < 1:
        raise SystemExit(f"{PROG}: --batch-size {args.batch_size}: at least 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"{PROG}: --out {args.out}: a file, not a folder; name a folder for the index")
    require_weights(PROG, args.ckpt, args.untrained)
    check_files(PROG, [("--config", c) for c in args.config])
    with user_errors(PROG):
        try:  # read (and every view decoded once) before the model, which takes seconds to minutes
            catalogue = read_catalogue(args.catalogue, default_dataset=args.dataset)
        except (FileNotFoundError, ValueError) as exc:
            raise _exit(PROG, one_line(exc), exc) from None
        counts = catalogue.counts
        if counts["no_readable_images"] or counts["unreadable_views"]:
            print(f"{PROG}: skipped {counts['unreadable_views']} unreadable views; {counts['no_readable_images']} "
                  f"of {counts['products_in']} products have no readable view and are left out "
                  f"(counted in {Path(args.out) / SUMMARY})", file=sys.stderr, flush=True)
        model, dm, fingerprint = load_with_fingerprint(args.config, args.ckpt, extra, needs_data=False)
        _refuse_caption_targets(model)
        products = catalogue.products
        emb = embed_catalogue(model, dm.image_transform, products, args.batch_size)
        ids, datasets = [p.product_id for p in products], [p.dataset for p in products]
        index = GalleryIndex.build(emb, ids, datasets, kind=args.kind, fingerprint=fingerprint)
        out = index.save(args.out)
        indexed = {d: len(v) for d, v in index.ids.items()}
        _write_summary(out, catalogue, indexed)
    print(f"indexed {len(ids)} products ({', '.join(f'{d}: {n}' for d, n in indexed.items())}; {args.kind}) "
          f"in {out}")
