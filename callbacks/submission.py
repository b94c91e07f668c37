"""``lightning predict``: rank the gallery for every query and write a submission file.

For each query (source product + modification text) the ``top_k`` gallery products of its own
dataset are listed by their original ids (FashionIQ image names, FashionMV product paths), best
first. This is how FashionIQ's test split, which has no public targets, is submitted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.interfaces import RetrievalData
from lightning_modules.retrieval import gather_objects, topk


class RetrievalSubmission(BasePredictionWriter):
    """Writes ``{output_dir}/submission_{split}.json``: ``[{dataset, candidate, text, ranking}]``.

    Args:
        output_dir: folder of the file (default ``trainer.default_root_dir``).
        top_k: products listed per query (FashionIQ: 50).
    """

    def __init__(self, output_dir: str | None = None, top_k: int = 50) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.top_k = top_k
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if not predictions or not isinstance(predictions[0], list):
            raise ValueError("RetrievalSubmission needs the gallery and query predict dataloaders "
                             "(ShardDataModule.predict_dataloader)")
        gallery = gather_objects([row for batch in predictions[0] for row in _rows(batch)])
        queries = gather_objects([row for batch in predictions[1] for row in _rows(batch)])
        if not trainer.is_global_zero:
            return
        out: list[dict[str, Any]] = []
        for dataset in sorted({q["dataset"] for q in queries}):
            items = [g for g in gallery if g["dataset"] == dataset]
            qs = [q for q in queries if q["dataset"] == dataset]
            if not items:
                raise ValueError(f"no gallery products for dataset {dataset!r}: cannot rank its queries")
            _, idx = topk(torch.stack([q["embedding"] for q in qs]), torch.stack([g["embedding"] for g in items]),
                          self.top_k)
            for q, row in zip(qs, idx.tolist(), strict=True):
                entry = {"dataset": dataset, "candidate": q["raw_id"], "text": q["text"],
                         "ranking": [items[i]["raw_id"] for i in row]}
                if q.get("target"):
                    entry["target"] = q["target"]
                out.append(entry)
        dm = trainer.datamodule
        split = dm.predict_split if isinstance(dm, RetrievalData) else "predict"
        folder = Path(self.output_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"submission_{split}.json"
        self.path.write_text(json.dumps(out, indent=1))


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    emb = batch["embedding"].float()
    if "product_id" in batch:
        return [{"dataset": d, "raw_id": r, "embedding": e}
                for d, r, e in zip(batch["dataset"], batch["raw_id"], emb, strict=True)]
    return [{"dataset": d, "raw_id": r, "text": t, "target": tg, "embedding": e}
            for d, r, t, tg, e in zip(batch["dataset"], batch["raw_id"], batch["text"], batch["target_raw_id"], emb,
                                      strict=True)]
