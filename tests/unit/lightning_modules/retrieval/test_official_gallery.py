"""FashionMV's gallery as the release's own evaluator builds it, also when images are missing.

The evaluator ranks each dataset's queries against every product named in any of that dataset's
val triplets whose image folder exists and holds images, whether or not the product's own triplets
survived. ``configs/eval/fashionmv.yaml`` must reproduce that gallery from the converted shards;
the older ``gallery_protocol: queries`` kept only products of surviving triplets and scored 8-12
points above the evaluator on copies with missing folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from datamodules.converters import convert_fashionmv
from datamodules.schema import stable_id
from datamodules.shards import iterate_shards, read_manifest, shard_urls
from lightning_modules.core.evaluation import RetrievalEval

ROOT = Path(__file__).resolve().parents[4]

# dataset -> triplets (source, target); folders removed below: c and e, and g is an empty folder.
TRIPLETS = {"f200k": [("a", "b"), ("b", "c"), ("d", "e"), ("f", "g"), ("h", "a"), ("b", "h")],
            "deepfashion": [("p", "q"), ("q", "r"), ("r", "p")]}
MISSING, EMPTY = {"c", "e"}, {"g"}
# Worked out by hand: f200k names a-h; c and e have no folder, g no image: {a, b, d, f, h} remain,
# d and f although their only triplets are dropped. Surviving triplets: a→b, h→a, b→h.
OFFICIAL_GALLERY = {"f200k": 5, "deepfashion": 3}
QUERIES = {"f200k": 3, "deepfashion": 3}


def _layout(root: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for dataset, pairs in TRIPLETS.items():
        for s, t in pairs:
            rows.append({"source_id": s, "target_id": t, "dataset": dataset, "modification_text_short": f"{s} to {t}"})
            for pid in (s, t):
                folder = root / "images" / dataset / pid
                if pid in MISSING or folder.exists():
                    continue
                folder.mkdir(parents=True)
                if pid not in EMPTY:
                    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "0.jpg")
    (root / "data").mkdir(parents=True)
    (root / "data" / "val_triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _embedding(dataset: str, pid: str, query: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(stable_id(f"{dataset}|{pid}|{query}") % 2**31)
    return F.normalize(torch.randn(8, generator=gen), dim=-1)


def _official_recall(k: int) -> dict[str, float]:
    """The evaluator's rule, written independently: its gallery, a full sort, the query's own source kept."""
    out = {}
    for dataset, pairs in TRIPLETS.items():
        present = [p for p in dict.fromkeys(x for pair in pairs for x in pair) if p not in MISSING | EMPTY]
        gallery = torch.stack([_embedding(dataset, p) for p in present])
        hits = []
        for s, t in pairs:
            if s not in present or t not in present:
                continue  # the evaluator drops a triplet whose source or target has no images
            order = torch.argsort(gallery @ _embedding(dataset, f"{s}>{t}", query=True), descending=True)
            hits.append(present.index(t) in order[:k].tolist())
        out[dataset] = sum(hits) / len(hits)
    return out


def test_the_fashionmv_protocol_keeps_the_official_gallery_when_folders_are_missing(tmp_path: Path) -> None:
    _layout(tmp_path / "release")
    out = tmp_path / "shards"
    summary = convert_fashionmv(tmp_path / "release", out, splits=["val"])
    assert summary["f200k"]["val"]["products_missing"] == 3  # c, e (no folder) and g (no image) reported
    assert summary["f200k"]["val"]["triplets_skipped"] == 3
    protocol = OmegaConf.load(ROOT / "configs/eval/fashionmv.yaml").model.init_args.evaluation
    metric = RetrievalEval(top_k=tuple(protocol.top_k), score_k=tuple(protocol.score_k),
                           gallery_protocol=protocol.gallery_protocol, remove_source=protocol.remove_source).metric()
    names = sorted(TRIPLETS)
    manifest = read_manifest(out)
    for sample in iterate_shards(shard_urls(out, manifest, "val", "gallery")):
        meta = sample["json"]
        metric.update(_embedding(meta["dataset"], meta["raw_id"])[None], torch.tensor([stable_id(meta["product_id"])]),
                      torch.tensor([names.index(meta["dataset"])]), gallery=True)
    for sample in iterate_shards(shard_urls(out, manifest, "val", "triplets")):
        t = sample["json"]["triplet"]
        query = _embedding(t["dataset"], f"{t['source_id']}>{t['target_id']}", query=True)
        metric.update(query[None], torch.tensor([stable_id(t["target_id"])]), torch.tensor([names.index(t["dataset"])]),
                      gallery=False, source_ids=torch.tensor([stable_id(t["source_id"])]))
    metric.dataset_names = names
    got = metric.compute()
    for dataset in names:
        assert got[f"{dataset}/gallery_size"] == OFFICIAL_GALLERY[dataset]
        assert got[f"{dataset}/queries"] == QUERIES[dataset]
    for k in (1, 5):  # 5 >= the gallery: every present target is a hit, as in the evaluator
        official = _official_recall(k)
        for dataset in names:
            assert float(got[f"{dataset}/recall_at_{k}"]) == official[dataset]
