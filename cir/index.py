"""``cir index``: a catalogue of product photos, with no triplets, as a searchable gallery.

    cir index --config experiments/demos/clip4cir.yaml --ckpt outputs/clip4cir_demo/checkpoints/last.ckpt \\
        --catalogue data/shop --out index/shop [--kind hnsw] [--dataset shop] [--device auto]
    cir index --config ... --ckpt ... --embeddings exports/shop --out index/shop   # from a lightning predict export
    cir search query --index index/shop --config ... --ckpt ... --images front.jpg --text "in red"

Options after ``--`` go to the experiment's config. The experiment's data need not exist: only its
preprocessing is used. ``--catalogue`` is the layout ``cir build`` reads (``images/<product_id>/*.jpg``,
a product's views in name order, at most five, and an optional ``products.jsonl`` with
``product_id``, ``dataset``, ``category``, ``title``), the FashionMV release (``--layout fashionmv``:
``images/<dataset>/<product_id>/``) or a shard folder (its ``--split`` gallery). Every product with a
readable view is embedded with the trained model as its gallery item, its views read as evaluation
reads a shard's (a phone photo's EXIF orientation applied); unreadable views are skipped and counted,
and products with none are reported. ``--embeddings`` builds the index from the parts a ``lightning
predict`` export wrote (configs/export/catalogue.yaml: many GPUs, resumable), refused when the
export was made by another model or preprocessing. The index records the model's fingerprint, so
that ``cir search query`` refuses it to any other model; a kill while it is written leaves the
index that was there before.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from callbacks.embedding_writer import MODEL
from datamodules.atomic import write_text_atomic
from datamodules.catalogue_data import CatalogueDataModule, PartStream, resolve_layout
from datamodules.embedding_parts import read_export
from datamodules.transform_identity import hparams_digest
from lightning_modules.core import Retriever
from lightning_modules.core.embedding import Embedded, embed_products, place
from lightning_modules.retrieval import GalleryIndex

from .args import add_index_options, add_weights_options, command_parser, configure_index, index_build_options, parse
from .errors import _exit, check_files, one_line, user_errors
from .models import load_with_fingerprint, require_weights, resolve_device_or_exit
from .progress import Progress

PROG = "cir index"
SUMMARY = "catalogue_summary.json"


def build_parser() -> Any:
    p = command_parser("index", __doc__)
    add_weights_options(p, "embed with")
    p.add_argument("--catalogue", help="folder of images/<product_id>/*.jpg [+ products.jsonl], the FashionMV "
                   "release (--layout fashionmv) or a shard folder")
    p.add_argument("--embeddings", help="an export folder written by lightning predict with callbacks.EmbeddingWriter")
    p.add_argument("--layout", choices=["auto", "catalogue", "fashionmv", "shards"], default="auto",
                   help="how --catalogue is laid out (auto: a shard folder when it has manifest.json)")
    p.add_argument("--split", default="val", help="the gallery split of a shard folder")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--out", required=True, help="folder the index is written to (gallery_index.json, faiss files, "
                   f"{SUMMARY})")
    add_index_options(p)
    p.add_argument("--dataset", default="catalogue",
                   help="gallery name of products whose products.jsonl line names no dataset")
    p.add_argument("--batch-size", type=int, default=32, help="products embedded per forward pass")
    return p


def embed_source(model: Retriever, transform: Any, source: str, layout: str, dataset: str, split: str,
                 batch_size: int, device: torch.device,
                 ) -> tuple[Embedded, list[dict[str, str]], int, dict[str, int]]:
    """Every product of ``source`` embedded as the exporter embeds it (one part, this process):
    the embeddings, the products with no readable view, the unreadable views, the listing counts."""
    data = CatalogueDataModule(source, layout=layout, split=split, dataset=dataset, batch_size=batch_size,
                               num_workers=0, part_size=2**62)
    data.set_image_transform(transform)
    parts = data.parts
    total = sum(len(p.products) for p in parts) if parts and parts[0].shard is None else None
    skipped: list[dict[str, str]] = []
    unreadable = 0

    def batches() -> Any:
        nonlocal skipped, unreadable
        for part in parts:
            for batch in PartStream([part], data.image_transform, batch_size):
                if batch["part_end"]:
                    skipped += batch["skipped"]
                    unreadable += batch["unreadable_views"]
                if batch["meta"]:
                    yield batch

    target = place(model, device)
    with Progress(PROG, "embedding", total, "product") as bar:
        try:
            embedded = embed_products(model, batches(), target, progress=bar)
        except ValueError as exc:  # nothing readable at all
            raise SystemExit(f"{PROG}: {source}: {one_line(exc)}") from None
    return embedded, skipped, unreadable, data.counts


def _refuse_caption_targets(model: Any) -> None:
    # An item of such a model's gallery is its image and its caption; a catalogue has no captions,
    # so its embeddings would not be the ones evaluation measured.
    if getattr(model, "target_caption_weight", 0):
        raise SystemExit(f"{PROG}: {type(model).__name__} adds each product's caption to its embedding "
                         f"(target_caption_weight={model.target_caption_weight}) and a catalogue has none: "
                         "caption it first, or set model.init_args.target_caption_weight=0 after --")


def _write_summary(out: Path, body: dict[str, Any]) -> None:
    write_text_atomic(out / SUMMARY, json.dumps(body, indent=2))


def export_mismatch(plan: dict[str, Any], fingerprint: dict[str, str], model: Any) -> str | None:
    """One line naming what differs between the model an export was made with and this run's."""
    current = {**fingerprint, "model_hparams": hparams_digest(getattr(model, "hparams", {}))}
    differ = [f"{key} {plan.get(key)!r} (export) vs {current.get(key)!r} (this run)" for key in MODEL
              if plan.get(key) != current.get(key)]
    if not differ:
        return None
    return ("--embeddings was exported by another model: " + "; ".join(differ) +
            ". Index it with the experiment, overrides and checkpoint it was exported with, or export again")


def main(argv: list[str] | None = None) -> None:
    args, extra = parse(build_parser(), argv, passthrough=True)
    if args.batch_size < 1:
        raise SystemExit(f"{PROG}: --batch-size {args.batch_size}: at least 1")
    if (args.catalogue is None) == (args.embeddings is None):
        raise SystemExit(f"{PROG}: give --catalogue DIR (photos to embed) or --embeddings DIR (a lightning predict "
                         "export), one of the two")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"{PROG}: --out {args.out}: a file, not a folder; name a folder for the index")
    require_weights(PROG, args.ckpt, args.untrained)
    check_files(PROG, [("--config", c) for c in args.config])
    device = resolve_device_or_exit(PROG, args.device)
    with user_errors(PROG):
        export = None
        try:  # listed (or the export read) before the model, which takes seconds to minutes to load
            if args.embeddings:
                export = read_export(args.embeddings)
            else:
                listing = CatalogueDataModule(args.catalogue, layout=args.layout, split=args.split,
                                              dataset=args.dataset)
                listing.parts  # noqa: B018 (lists the products: a wrong folder fails here, in one line)
        except (FileNotFoundError, ValueError) as exc:
            raise _exit(PROG, one_line(exc), exc) from None
        model, dm, fingerprint = load_with_fingerprint(args.config, args.ckpt, extra, needs_data=False)
        _refuse_caption_targets(model)
        if export is not None:
            if problem := export_mismatch(export.plan, fingerprint, model):
                raise SystemExit(f"{PROG}: {problem}")
            emb, ids, datasets = torch.from_numpy(export.per_product()), export.ids, export.datasets
            skipped, unreadable, listed = export.skipped, export.unreadable_views, export.plan.get("listing", {})
            source = {"embeddings": str(Path(args.embeddings).resolve()), "catalogue_dir": export.plan.get("source"),
                      "layout": export.plan.get("layout"), "split": export.plan.get("split")}
        else:
            embedded, skipped, unreadable, listed = embed_source(model, dm.image_transform, args.catalogue, args.layout,
                                                                 args.dataset, args.split, args.batch_size, device)
            emb, ids, datasets = embedded.embeddings, embedded.product_ids, embedded.datasets
            source = {"catalogue_dir": str(Path(args.catalogue).resolve()),
                      "layout": resolve_layout(Path(args.catalogue), args.layout), "split": args.split,
                      "dataset": args.dataset}
        if skipped or unreadable:
            print(f"{PROG}: skipped {unreadable} unreadable views; {len(skipped)} of {len(ids) + len(skipped)} "
                  f"products have no readable view and are left out (listed in {Path(args.out) / SUMMARY})",
                  file=sys.stderr, flush=True)
        try:  # a multi-vector model's [N, V, D]: every view indexed with its product, searched by MaxSim
            with Progress(PROG, f"indexing ({args.kind})", len(emb) if emb.ndim == 2 else None, "vector") as bar:
                index = GalleryIndex.build(emb, ids, datasets, kind=args.kind, fingerprint=fingerprint,
                                           **index_build_options(args), progress=bar)
            configure_index(index, args)
        except ValueError as exc:  # a factory string faiss refuses, too few vectors to train it, ...
            raise SystemExit(f"{PROG}: {one_line(exc)}") from None
        out = index.save(args.out)
        indexed = {d: len(v) for d, v in index.ids.items()}
        counts = {**listed, "products_in": len(ids) + len(skipped), "unreadable_views": unreadable,
                  "no_readable_images": len(skipped)}
        _write_summary(out, {**source, "catalogue": counts, "indexed": indexed,
                             "without_readable_view": len(skipped), "skipped": skipped})
    print(f"indexed {len(ids)} products ({', '.join(f'{d}: {n}' for d, n in indexed.items())}; {args.kind}) "
          f"in {out}")
