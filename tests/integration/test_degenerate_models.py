"""A degenerate model never scores well and never becomes the best checkpoint.

Constant, all-zero and NaN embeddings go through a real ``Trainer`` with the experiments' own
checkpoint callbacks (``configs/callbacks/retrieval.yaml``): constant and zero embeddings score
Recall@K = 0 (every item ties with the target, and ties rank above it), NaN embeddings stop the
evaluation with one line, and none of them is ever kept as the best checkpoint, even as a run's
first evaluation. The healthy reference is an oracle whose queries are their targets' embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser

from callbacks import BestCheckpoint
from datamodules import ShardDataModule
from datamodules.schema import stable_id
from lightning_modules import CLIP4CIR, Combiner
from lightning_modules.backbones import CLIPBackbone
from lightning_modules.core.contract import Products
from lightning_modules.retrieval.recall import NonFiniteEmbeddings

ROOT = Path(__file__).resolve().parents[2]
DIM = 32


def _product_vector(pid: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(stable_id(pid) % 2**31)
    return F.normalize(torch.randn(DIM, generator=gen), dim=-1)


class Scripted(CLIP4CIR):
    """CLIP4CIR whose evaluation embeddings follow ``modes[epoch]``: ``oracle`` (queries equal their
    targets' embeddings), ``constant``, ``zero`` or ``nan``. Training runs the real model."""

    def __init__(self, modes: list[str]) -> None:
        super().__init__(CLIPBackbone("tiny"), Combiner(48))
        self.modes = modes

    def _mode(self) -> str:
        return self.modes[min(self.current_epoch, len(self.modes) - 1)]

    def _scripted(self, ids: list[str]) -> torch.Tensor:
        mode = self._mode()
        if mode == "oracle":
            return torch.stack([_product_vector(i) for i in ids]).to(self.device)
        value = {"constant": 0.3, "zero": 0.0, "nan": float("nan")}[mode]
        return torch.full((len(ids), DIM), value, device=self.device)

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.training:
            return super().encode_query(batch)
        return self._scripted(list(batch["target_id"]))

    def encode_target(self, products: Products) -> torch.Tensor:
        if self.training:
            return super().encode_target(products)
        return self._scripted([m["product_id"] for m in products.meta])


def _experiment_checkpoint(root: Path) -> BestCheckpoint:
    """The monitored checkpoint exactly as the experiments configure it."""
    config = yaml.safe_load((ROOT / "configs/callbacks/retrieval.yaml").read_text())
    (entry,) = [c for c in config["trainer"]["callbacks"] if c.get("init_args", {}).get("monitor")]
    init = dict(entry["init_args"], dirpath=str(root / "checkpoints"))
    parser = ArgumentParser()
    parser.add_argument("--cb", type=BestCheckpoint)
    cb = parser.instantiate_classes(parser.parse_object({"cb": {"class_path": entry["class_path"], "init_args": init}}))
    assert isinstance(cb.cb, BestCheckpoint) and cb.cb.monitor == "val/score"
    return cb.cb


def _trainer(root: Path, epochs: int) -> tuple[L.Trainer, BestCheckpoint]:
    ckpt = _experiment_checkpoint(root)
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=1, logger=False, enable_progress_bar=False,
                        callbacks=[ckpt], default_root_dir=root, num_sanity_val_steps=0, enable_model_summary=False)
    return trainer, ckpt


def _data(small_data: Path) -> ShardDataModule:
    return ShardDataModule(str(small_data), batch_size=8, eval_batch_size=32, num_workers=0)


@pytest.mark.parametrize("mode", ["constant", "zero"])
def test_validate_scores_a_collapsed_model_zero(mode: str, small_data: Path, tmp_path: Path) -> None:
    trainer, _ = _trainer(tmp_path, 1)
    trainer.validate(Scripted([mode]), datamodule=_data(small_data))
    metrics = trainer.callback_metrics
    assert metrics["val/score"] == 0.0 and metrics["val/recall_at_10"] == 0.0
    assert metrics["val/chance/score"] > 0  # below chance, not at a perfect 1.0


def test_validate_refuses_nan_embeddings_in_one_line(small_data: Path, tmp_path: Path) -> None:
    trainer, _ = _trainer(tmp_path, 1)
    with pytest.raises(NonFiniteEmbeddings, match=r"^val: \d+ of \d+ gallery embeddings of dataset '\w+'"):
        trainer.validate(Scripted(["nan"]), datamodule=_data(small_data))


def test_the_oracle_scores_one(small_data: Path, tmp_path: Path) -> None:
    trainer, _ = _trainer(tmp_path, 1)
    trainer.validate(Scripted(["oracle"]), datamodule=_data(small_data))
    metrics = trainer.callback_metrics
    assert metrics["val/recall_at_1"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["constant", "zero"])
def test_a_collapsed_epoch_is_never_the_best_checkpoint(mode: str, small_data: Path, tmp_path: Path) -> None:
    """A collapse as the first evaluation (Lightning admits any first score into an empty top-k)
    and after a good epoch: the best checkpoint is the good epoch's, or none at all."""
    trainer, ckpt = _trainer(tmp_path / "first", 1)
    trainer.fit(Scripted([mode]), datamodule=_data(small_data))
    assert ckpt.best_model_path == "" and len(ckpt.refused) == 1
    assert (tmp_path / "first" / "checkpoints" / "last.ckpt").is_file()  # the run itself is kept

    trainer, ckpt = _trainer(tmp_path / "later", 2)
    trainer.fit(Scripted(["oracle", mode]), datamodule=_data(small_data))
    assert float(ckpt.best_model_score) == 1.0 and Path(ckpt.best_model_path).name.startswith("epoch00-")
    assert [p.name for p in (tmp_path / "later" / "checkpoints").glob("epoch*.ckpt")] == [
        Path(ckpt.best_model_path).name]


@pytest.mark.slow
def test_nan_embeddings_stop_the_run_and_keep_the_earlier_best(small_data: Path, tmp_path: Path) -> None:
    trainer, ckpt = _trainer(tmp_path, 2)
    with pytest.raises(NonFiniteEmbeddings):
        trainer.fit(Scripted(["oracle", "nan"]), datamodule=_data(small_data))
    assert float(ckpt.best_model_score) == 1.0 and Path(ckpt.best_model_path).name.startswith("epoch00-")
    assert len(list((tmp_path / "checkpoints").glob("epoch*.ckpt"))) == 1
