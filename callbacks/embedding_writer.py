"""``lightning predict``: the catalogue exporter's writer. Each rank writes the parts it embedded.

    lightning predict --config EXP --config configs/export/catalogue.yaml --ckpt_path CKPT \\
        --data.init_args.source=data/shop --trainer.callbacks.init_args.out_dir=exports/shop

With ``datamodules.CatalogueDataModule`` (products cut into numbered parts, each owned by one rank
and worker), every part is written as ``part-NNNNNN.npy`` + ``.json`` once its last batch is
embedded (``datamodules.embedding_parts``: atomic, the JSON last). Before any batch, the finished
parts in ``out_dir`` are handed to the DataModule, which leaves them out: a killed export run again
with the same command redoes only the unfinished parts, on the same number of GPUs or another.
``export.json`` records the source, the part plan and the model (family, checkpoint, preprocessing),
and a rerun whose plan or model differs is refused instead of mixing two exports. Multi-vector
products are written one row per vector with its index: the view for MaxSim view strategies, the
query token for SPRC.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.atomic import write_json_atomic
from datamodules.embedding_parts import (
    EXPORT_FILE,
    ExportRefused,
    PartRows,
    check_plan,
    checkpoint_stamp,
    finished_parts,
    write_part,
)
from datamodules.interfaces import PartitionedProducts
from datamodules.transform_identity import describe_transform, hparams_digest

# export.json keys a rerun must match: the same products cut the same way, the same model and pixels.
PLAN = ("source", "layout", "split", "parts", "part_size", "products_digest")
MODEL = ("family", "checkpoint", "model_hparams", "preprocessing", "image_transform", "normalisation")


class EmbeddingWriter(BasePredictionWriter):
    """Writes every product embedding of a ``lightning predict`` run into ``out_dir`` as parts.

    Args:
        out_dir: the export folder (created; a rerun into it resumes).
    """

    def __init__(self, out_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self._open: dict[int, dict[str, Any]] = defaultdict(lambda: {"chunks": [], "rows": [], "views": [], "ids": [],
                                                                       "raw_ids": [], "datasets": []})
        self.written: list[int] = []
        self._plan: dict[str, Any] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Before the predict loader exists: the finished parts must be left out of it.
        if stage != "predict":
            return
        dm = trainer.datamodule
        if not isinstance(dm, PartitionedProducts):
            raise ExportRefused("callbacks.EmbeddingWriter needs data that comes in parts: set data.class_path to "
                             "datamodules.CatalogueDataModule (configs/export/catalogue.yaml does)")
        self._plan = dm.export_plan()  # once: it digests every product key (millions for a large catalogue)
        if problem := check_plan(self.out_dir, self._plan, PLAN):
            raise ExportRefused(problem)
        # Each rank reads the finished parts before any rank writes one (no batch runs before
        # on_predict_start's barrier), and only its own parts matter to it.
        dm.exclude_parts(finished_parts(self.out_dir))

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the model's setup gave the DataModule its preprocessing, which the export records.
        # Rank 0 alone hashes the checkpoint and compares; every rank learns the verdict, so all stop
        # together or none does.
        problem = None
        if trainer.is_global_zero:
            plan = {**self._plan, **_model_identity(trainer, pl_module, trainer.datamodule)}
            problem = check_plan(self.out_dir, plan, MODEL)
            if problem is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.out_dir / EXPORT_FILE, plan)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise ExportRefused(problem)

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        part = self._open[int(batch["part"])]
        emb = prediction["embedding"]
        if emb is not None and len(prediction["product_id"]):
            emb = emb.float().cpu()
            start = len(part["ids"])
            if emb.ndim == 2:
                part["chunks"].append(emb.numpy())
                part["rows"] += range(start, start + len(emb))
                part["views"] += [0] * len(emb)
            else:  # [B, V, D]: one row per vector that stands for something
                present = present_vectors(emb, batch.get("mask"))
                rows, views = present.nonzero(as_tuple=True)
                part["chunks"].append(emb[rows, views].numpy())
                part["rows"] += (rows + start).tolist()
                part["views"] += views.tolist()
            if not np.isfinite(part["chunks"][-1]).all():  # a broken model is stopped, never exported
                raise ExportRefused(f"part {int(batch['part'])}: non-finite embeddings among products "
                                         f"{list(prediction['product_id'])[:3]}...; nothing of this part was written")
            part["ids"] += list(prediction["product_id"])
            part["raw_ids"] += list(prediction["raw_id"])
            part["datasets"] += list(prediction["dataset"])
        if batch["part_end"]:
            self._write(int(batch["part"]), batch)

    def _write(self, number: int, batch: dict[str, Any]) -> None:
        part = self._open.pop(number)
        chunks = part["chunks"]
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
        write_part(self.out_dir, number, PartRows(vectors, part["rows"], part["views"], part["ids"], part["raw_ids"],
                                                  part["datasets"], list(batch["skipped"]),
                                                  int(batch["unreadable_views"])))
        self.written.append(number)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._open:  # a batch stream that ended inside a part: a bug of the data side, never silent
            raise RuntimeError(f"parts {sorted(self._open)} had no last batch; nothing of them was written")


def present_vectors(emb: torch.Tensor, mask: Any) -> torch.Tensor:
    """``[B, V]``: the rows of a multi-vector embedding to export. A MaxSim model fills the slots of
    views a product lacks with NaN rows (its width is the most views any product may have, the
    batch's mask only as wide as this batch's longest product), so a row counts where it is finite
    and the mask, padded to that width, does not rule it out. SPRC's vectors are query tokens: all count."""
    present = torch.isfinite(emb).flatten(2).all(-1).cpu()
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] <= emb.shape[1]:
        padded = torch.zeros(emb.shape[:2], dtype=torch.bool)
        padded[:, : mask.shape[1]] = mask.cpu()
        present &= padded
    return present


def _model_identity(trainer: Trainer, pl_module: LightningModule, dm: Any) -> dict[str, Any]:
    preprocessing, settings, normalisation = describe_transform(getattr(dm, "image_transform", None))
    checkpoint = checkpoint_stamp(trainer.ckpt_path, os.environ.get("PL_GLOBAL_SEED"))
    return {"family": type(pl_module).__name__, "checkpoint": checkpoint,
            "model_hparams": hparams_digest(pl_module.hparams), "preprocessing": preprocessing,
            "image_transform": settings, "normalisation": normalisation}
