"""Tiny SPRC learns on the generated data: a shortened version of experiments/demos/sprc_demo.yaml ends
well above chance."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import ShardDataModule
from lightning_modules import SPRC
from lightning_modules.backbones import Blip2Backbone
from lightning_modules.families.sprc import OneCycleSchedule


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("sprc-quality")
    write_synthetic(out, products=600, seed=0)
    return out


@pytest.mark.slow
def test_sprc_learns(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    L.seed_everything(0)
    # configs/model/sprc/tiny.yaml's settings at twice its peak LR, for a run of three epochs
    model = SPRC(Blip2Backbone("tiny"), freeze_vision=False,
                 optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.01),
                 scheduler=lambda o: OneCycleSchedule(o, pct_start=0.1, div_factor=10.0, final_div_factor=100.0))
    dm = ShardDataModule(str(data), batch_size=16, eval_batch_size=64, num_workers=0)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, check_val_every_n_epoch=3)
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for ds in ("synth_studio", "synth_street"):
        size = metrics[f"val/{ds}/gallery_size"]  # ~60 products: chance R@10 = 10 / 60
        print(ds, size, {k: round(metrics[f"val/{ds}/recall_at_{k}"], 3) for k in (1, 5, 10)})
        # Measured 2.4× and 2.5× chance with the old data order, 1.75× (one sub-dataset) with the
        # resumable stream's; an untrained model sits at 1×, the full demo reaches 7.9×.
        assert metrics[f"val/{ds}/recall_at_10"] > 1.4 * (10 / size)
