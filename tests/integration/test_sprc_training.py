"""Tiny SPRC learns to read the text on the generated data: a shortened version of
experiments/demos/sprc_demo.yaml beats its own text-blind line within the query groups and at R@10.

With SPRC's align term (which pulls the generated prompt, the image's only way into the query,
towards one learnt vector) the random tiny BLIP-2 did not beat its text-blind line at R@1 in 8
epochs (0.055-0.076 against 0.068-0.071 over three seeds). Without it, and trained for 16 epochs,
it does in five of six runs (the measurements below); its R@1 over the whole gallery is not yet
robust at this scale, so the test asserts what is.
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
    # configs/model/sprc/tiny.yaml and experiments/demos/sprc_demo.yaml's settings, validated once at the end
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
    # Seeds 0/1/2 (epoch permutation, masked false negatives, generator version 5), each run with two
    # torch threads and with one (as CI's workers run; the reduction order differs, and so does the
    # trajectory):
    #   R@1 0.100/0.091/0.100 vs text-blind 0.057/0.065/0.058 (two threads, 1.40-1.75x),
    #       0.055/0.071/0.082 vs 0.057/0.046/0.064 (one thread, 0.96-1.54x): not asserted, since
    #       seed 0 on one thread stays at its text-blind line;
    #   Recall_subset@1 0.395/0.306/0.402 and 0.348/0.296/0.434 vs 0.197/0.185/0.200 (1.60-2.17x);
    #   R@10 gain +0.18/+0.06/+0.14 and +0.14/+0.09/+0.14; two texts 0.284-0.429.
    # The two-text share is printed, not asserted: one run is near a random scorer's 0.25.
    assert pairs > 100
    assert metrics["val/recall_subset_at_1"] > 1.4 * metrics["val/text_blind/recall_subset_at_1"]
    assert metrics["val/recall_at_10"] > metrics["val/text_blind/recall_at_10"] + 0.04
