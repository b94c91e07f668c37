"""``cir mine-negatives``: offline hard negatives for training, mined with a trained model.

    cir mine-negatives --config experiments/demos/clip4cir.yaml --ckpt outputs/clip4cir_demo/checkpoints/last.ckpt \\
        [--k 8] [--margin 0.95] [--split train] [--batch-size 64] [--num-workers 2] [--device cuda]

Embeds the split's gallery with the target encoder and every triplet's query (source views + short
modification text) with the query encoder, and keeps for each triplet the k best-scoring gallery
products of its own dataset and split, except the target and any product scoring above
``margin × score(query, target)``: such a product is more likely an unlabelled positive (a
near-duplicate of the target) than a negative (NV-Retriever's positive-aware "TopK-PercPos" filter;
for a negative positive score the bound is ``score − (1 − margin)·|score|``, still below it). The
source product stays eligible: it is the most useful negative of a composed query.

Writes ``negatives-{split}.json`` next to the shards (and the gallery's byte-offset index,
``{split}-gallery-offsets.json``), atomically; train with ``--data.init_args.hard_negatives=K``.
Options after ``--`` go to the experiment's config (e.g. ``-- --data.init_args.data_dir=...``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from datamodules.batching import TripletExample, collate
from datamodules.interfaces import RetrievalData
from datamodules.negatives import gallery_offsets, write_negatives
from datamodules.shards import SkipCounter, decode_sample, read_manifest, shard_urls
from lightning_modules.core import Retriever
from lightning_modules.core.embedding import embed_products, place
from lightning_modules.core.embedding import embed_queries as embed_query_batches
from lightning_modules.retrieval.search import block_size, similarities

from .args import command_parser, parse
from .errors import user_errors
from .models import gallery_total, load_model_and_data
from .progress import Progress

PROG = "cir mine-negatives"
SCORE_BLOCK = 2**24  # scores held at once per query chunk (64 MiB of float32)


@dataclass
class Mined:
    """One triplet's negatives: gallery rows and scores, best first, and the positive's score."""

    rows: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    positive: float | None = None
    dropped: int = 0  # products removed by the margin (likely false negatives)


def score_matrix(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` scores (dot products, or MaxSim for multi-vectors), in gallery blocks small
    enough for MaxSim's view-pair scores (``search.block_size``)."""
    step = block_size(queries, gallery, 4096)
    return torch.cat([similarities(queries, gallery[s:s + step]) for s in range(0, gallery.shape[0], step)], 1)


def mine(queries: torch.Tensor, query_datasets: list[str], target_rows: torch.Tensor, gallery: torch.Tensor,
         gallery_datasets: list[str], k: int, margin: float) -> list[Mined]:
    """Negatives of every query among the gallery rows of its own dataset.

    ``target_rows[i]`` is query i's target row in ``gallery`` (-1: not in the gallery, then no
    negatives: without the positive's score the false-negative filter cannot work). The positive's
    score is read from the same score matrix as the candidates', so an exact duplicate of the
    target scores exactly as the target does and always falls above the bound."""
    out = [Mined() for _ in range(queries.shape[0])]
    for dataset in sorted(set(query_datasets)):
        g_rows = torch.tensor([i for i, d in enumerate(gallery_datasets) if d == dataset], dtype=torch.long)
        q_rows = torch.tensor([i for i, d in enumerate(query_datasets) if d == dataset], dtype=torch.long)
        if len(g_rows) == 0:
            continue
        local = torch.full((gallery.shape[0],), -1, dtype=torch.long)
        local[g_rows] = torch.arange(len(g_rows))
        g = gallery[g_rows]
        chunk = max(1, min(SCORE_BLOCK // len(g_rows), block_size(queries, g, 4096)))
        for start in range(0, len(q_rows), chunk):
            rows = q_rows[start:start + chunk]
            scores = score_matrix(queries[rows], g).float()
            t = target_rows[rows]
            t_local = torch.where(t >= 0, local[t.clamp(min=0)], -1)
            has = t_local >= 0
            at_target = (has.nonzero()[:, 0], t_local[has])
            pos = torch.zeros(len(rows))
            pos[has] = scores[at_target]
            bound = pos - (1 - margin) * pos.abs()
            above = scores > bound[:, None]
            above[at_target] = False  # the target is excluded anyway; ``dropped`` counts the others
            scores = scores.masked_fill(above, -torch.inf)
            scores[at_target] = -torch.inf
            scores[~has] = -torch.inf
            best_s, best_i = scores.topk(min(k, len(g_rows)), dim=1)
            for j, row in enumerate(rows.tolist()):
                if not has[j]:
                    continue
                keep = best_s[j].isfinite()
                out[row] = Mined(g_rows[best_i[j][keep]].tolist(), best_s[j][keep].tolist(), float(pos[j]),
                                 int(above[j].sum()))
    return out


class KeyedQuery:
    """A query sample with its sample key, which names it in the sidecar. A class: workers pickle it."""

    def __init__(self, example: TripletExample) -> None:
        self.example = example

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {**self.example(sample), "key": sample["__key__"]}


def embed_gallery(model: Retriever, dm: RetrievalData, split: str,
                  device: torch.device) -> tuple[torch.Tensor, list[str], list[str]]:
    """Every gallery product of ``split`` as the target encoder sees it: embeddings, ids, datasets."""
    with Progress(PROG, f"embedding the {split} gallery", gallery_total(dm, split), "product") as progress:
        out = embed_products(model, dm.eval_dataloaders(split)[0], device, progress=progress)
    return out.embeddings, out.product_ids, out.datasets


def embed_queries(model: Retriever, dm: RetrievalData, split: str, device: torch.device, batch_size: int,
                  workers: int) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Every triplet of ``split`` as the query encoder sees it (short text, as in evaluation):
    embeddings and, per row, the sample key, dataset, source and target ids."""
    urls = shard_urls(dm.data_dir, read_manifest(dm.data_dir), split, "triplets")
    counter = SkipCounter(f"{split}-mining")
    example = TripletExample(dm.image_transform, "short", with_target=False, captions=dm.captions)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(handler=counter),
        wds.map(decode_sample, handler=counter), wds.map(KeyedQuery(example), handler=counter),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    embs, rows = [], []
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=min(workers, len(urls)))
    with Progress(PROG, f"embedding the {split} queries", gallery_total(dm, split, "triplets"), "query") as progress:
        for emb, batch in embed_query_batches(model, loader, device, progress=progress):
            embs.append(emb)
            rows += [{"key": k, "dataset": d, "source_id": s, "target_id": t}
                     for k, d, s, t in zip(batch["key"], batch["dataset"], batch["source_id"], batch["target_id"],
                                           strict=True)]
    return torch.cat(embs), rows


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("mine-negatives", __doc__)
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable)")
    parser.add_argument("--ckpt", required=True, help="checkpoint of the trained model that scores candidates")
    parser.add_argument("--k", type=int, default=8, help="negatives kept per triplet")
    parser.add_argument("--margin", type=float, default=0.95,
                        help="drop candidates scoring above margin × the positive's score (likely false negatives)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    args, extra = parse(parser, argv, passthrough=True)
    bad = [f"--k {args.k}: must be >= 1"] if args.k < 1 else []
    bad += [f"--margin {args.margin}: must be in (0, 1]"] if not 0 < args.margin <= 1 else []
    bad += [f"--batch-size {args.batch_size}: must be >= 1"] if args.batch_size < 1 else []
    files = [*(("--config", c) for c in args.config), ("--ckpt", args.ckpt)]
    missing = [f"{option} {path}: no such file" for option, path in files if not Path(path).is_file()]
    if bad:
        parser.error("; ".join(bad + missing))
    if missing:  # one line, without argparse's usage text, before the model is built
        raise SystemExit(f"cir mine-negatives: {'; '.join(missing)}")
    with user_errors("cir mine-negatives"):  # a shard folder found missing later, Ctrl-C: one line
        _mine(args, extra)


def _mine(args: argparse.Namespace, extra: list[str]) -> None:
    model, dm = load_model_and_data(args.config, args.ckpt, extra, prog="cir mine-negatives")
    device = place(model, args.device)
    gallery, ids, gallery_datasets = embed_gallery(model, dm, args.split, device)
    queries, rows = embed_queries(model, dm, args.split, device, args.batch_size, args.num_workers)
    where = {(d, pid): i for i, (d, pid) in enumerate(zip(gallery_datasets, ids, strict=True))}
    target_rows = torch.tensor([where.get((r["dataset"], r["target_id"]), -1) for r in rows], dtype=torch.long)
    mined = mine(queries, [r["dataset"] for r in rows], target_rows, gallery, gallery_datasets, args.k, args.margin)
    records = {r["key"]: {"dataset": r["dataset"], "target_id": r["target_id"], "ids": [ids[i] for i in m.rows],
                          "scores": [round(s, 6) for s in m.scores], "positive": m.positive}
               for r, m in zip(rows, mined, strict=True)}
    settings = {"k": args.k, "margin": args.margin, "config": args.config, "ckpt": args.ckpt}
    path = write_negatives(dm.data_dir, args.split, records, settings)
    gallery_offsets(dm.data_dir, args.split)  # the index training reads products through, built once here
    counts = [len(m.rows) for m in mined]
    print(json.dumps({"sidecar": str(path), "triplets": len(rows), "gallery": len(ids),
                      "no_target_in_gallery": int((target_rows < 0).sum()),
                      "mean_negatives": round(sum(counts) / max(1, len(counts)), 3),
                      "dropped_above_margin": sum(m.dropped for m in mined)}))
