"""Tiny SPRC learns to read the text on the generated data: a shortened version of
experiments/demos/sprc_demo.yaml beats its own text-blind line on the query groups.

SPRC's tiny BLIP-2 learns slowest of the families: after 8 epochs it does not yet beat its
text-blind line at R@1 over the whole gallery (0.055-0.076 against 0.068-0.071 over three seeds),
only within the groups (see the measurements below); the README's demo table says how far the full
demo gets.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from support.quality import two_text_agreement

from datamodules import ShardDataModule
from lightning_modules import SPRC, RetrievalEval
from lightning_modules.backbones import Blip2Backbone
from lightning_modules.families.sprc import OneCycleSchedule, SPRCLoss

# CI runs seed 0; CIR_QUALITY_SEED=1 (data and training seed) is how the other seeds were measured.
SEED = int(os.environ.get("CIR_QUALITY_SEED", "0"))
EPOCHS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("sprc-quality")
    write_synthetic(out, products=1500, seed=SEED)
    return out


@pytest.mark.slow
def test_sprc_reads_the_text(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(SEED)
    L.seed_everything(SEED)
    # configs/model/sprc/tiny.yaml's settings (no align term) at twice its peak LR, for 16 epochs
    model = SPRC(Blip2Backbone("tiny"), freeze_vision=False, loss=SPRCLoss(rtc_weight=0.4, align_weight=0.0),
                 optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.01),
                 scheduler=lambda o: OneCycleSchedule(o, pct_start=0.1, div_factor=10.0, final_div_factor=100.0),
                 evaluation=RetrievalEval(remove_source=True, score_k=(1, 5, 10)))
    dm = ShardDataModule(str(data), batch_size=16, eval_batch_size=64, num_workers=0)
    trainer = L.Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, check_val_every_n_epoch=EPOCHS,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    share, pairs = two_text_agreement(model, dm)
    print({k: round(metrics[f"val/{k}"], 3) for k in ("recall_at_1", "text_blind/recall_at_1", "recall_at_10",
                                                       "text_blind/recall_at_10", "recall_subset_at_1",
                                                       "text_blind/recall_subset_at_1")}, share, pairs)
    # Seeds 0/1/2: Recall_subset@1 0.266/0.248/0.380 vs text-blind 0.197/0.186/0.200 (1.33-1.90x);
    # two texts 0.223/0.265/0.332 (text-blind: 0; a random scorer: 0.25).
    # The two-text share is printed, not asserted: at a random scorer's level (0.25), it would say nothing.
    assert pairs > 100
    assert metrics["val/recall_subset_at_1"] > 1.15 * metrics["val/text_blind/recall_subset_at_1"]
