"""Every family learns to compose on the generated data: after a shortened demo run, each trained
model beats its own text-blind line (each query replaced by the model's embedding of its source
product, the text ignored) by a clear margin, and the same source with two different texts finds
each text's own target.

The generated benchmark is built so that ignoring the text cannot score (groups of siblings that
differ only in the changed attributes, the source removed from the ranking, CIRR's protocol):
text-blind Recall_subset@1 is about 1 / group size (≈ 0.19 here), and it satisfies the two-text
check never (one query embedding cannot order two targets both ways; a random scorer would 25 % of
the time; only LLaVA-caption's oracle captions lift it clearly above that in these short runs).
Thresholds come from three seeds (data and training seed 0, 1, 2; ``CIR_QUALITY_SEED``) measured
on this 2-core machine with the epoch permutation and masked false negatives on generator version 5,
written beside each assertion and set below the lowest seed; CI runs seed 0. (SPRC:
test_sprc_training.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from support.quality import two_text_agreement

from callbacks.stage_switch import StageSwitch
from datamodules import ShardDataModule
from lightning_modules import CLIP4CIR, Combiner, LLaVACaptionCIR, RetrievalEval, StaticBankLoss, TransformerFusion
from lightning_modules.backbones import CLIPBackbone

PRODUCTS = 1500  # as the demos: a smaller split leaves too few steps for the tiny models to read the text
CIRR = RetrievalEval(remove_source=True, score_k=(1, 5, 10))  # configs/eval/generated.yaml

# CI runs seed 0; CIR_QUALITY_SEED=1 (data and training seed) is how the other seeds were measured.
SEED = int(os.environ.get("CIR_QUALITY_SEED", "0"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("quality")
    write_synthetic(out, products=PRODUCTS, seed=SEED)
    return out


def fit(module: L.LightningModule, dm: ShardDataModule, tmp_path: Path, epochs: int,
        callbacks: list[L.Callback] | None = None, **trainer: object) -> dict[str, float]:
    trainer_ = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=callbacks or [], default_root_dir=tmp_path, num_sanity_val_steps=0,
                         check_val_every_n_epoch=epochs, enable_model_summary=False, **trainer)
    trainer_.fit(module, datamodule=dm)
    return {k: float(v) for k, v in trainer_.callback_metrics.items()}


def assert_reads_the_text(metrics: dict[str, float], module: L.LightningModule, dm: ShardDataModule,
                          subset_ratio: float, r10_gain: float, two_text: float | None) -> None:
    """Recall_subset@1 at least ``subset_ratio`` × its text-blind line, R@10 at least ``r10_gain``
    above its text-blind line, and the two-text share above ``two_text``, which must then exceed a
    random scorer's 0.25 (``None``: the family's measured shares are near that level, so the check
    would say nothing; the share is printed)."""
    share, pairs = two_text_agreement(module, dm)
    lines = {k: round(metrics[f"val/{k}"], 3) for k in (
        "recall_at_1", "text_blind/recall_at_1", "recall_at_10", "text_blind/recall_at_10", "recall_subset_at_1",
        "text_blind/recall_subset_at_1", "chance/recall_at_1")}
    print(lines, {"two_text": round(share, 3), "pairs": pairs})
    assert pairs > 100
    assert metrics["val/recall_subset_at_1"] > subset_ratio * metrics["val/text_blind/recall_subset_at_1"]
    assert metrics["val/recall_at_10"] > metrics["val/text_blind/recall_at_10"] + r10_gain
    if two_text is not None:
        assert two_text > 0.25 and share > two_text


def _dm(data: Path, batch_size: int = 32, **kwargs: object) -> ShardDataModule:
    return ShardDataModule(str(data), batch_size=batch_size, eval_batch_size=64, num_workers=0, **kwargs)


def _opt(lr: float):  # noqa: ANN202
    return lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01)


@pytest.mark.slow
def test_clip4cir_two_stage_reads_the_text(data: Path, tmp_path: Path) -> None:
    # Seeds 0/1/2: Recall_subset@1 0.357/0.300/0.450 vs text-blind 0.197/0.185/0.200 (1.62-2.25x);
    # R@10 0.566/0.609/0.612 vs 0.426/0.550/0.406 (+0.06 to +0.21); two texts 0.381/0.295/0.349;
    # R@1 0.066/0.097/0.094 vs 0.068/0.077/0.060: not above its text-blind line on every seed, so not asserted.
    torch.manual_seed(SEED)
    L.seed_everything(SEED)
    module = CLIP4CIR(CLIPBackbone("tiny"), Combiner(48), stage2_loss=StaticBankLoss(), optimizer=_opt(5e-4),
                      evaluation=CIRR)
    dm = _dm(data)
    metrics = fit(module, dm, tmp_path, 12, [StageSwitch(switch_epoch=3)])
    assert module.training_stage == 2 and module.bank is not None
    # The two-text share is near a random scorer's level on one seed (0.30-0.38): not asserted.
    assert_reads_the_text(metrics, module, dm, subset_ratio=1.4, r10_gain=0.04, two_text=None)


@pytest.mark.slow
def test_llava_caption_two_stage_reads_the_text(data: Path, tmp_path: Path) -> None:
    # Seeds 0/1/2 (oracle captions): Recall_subset@1 0.418/0.415/0.376 vs text-blind 0.197/0.185/0.200
    # (1.88-2.24x); R@10 0.619/0.694/0.606 vs 0.424/0.458/0.406 (+0.20 to +0.24); two texts
    # 0.436/0.424/0.379; R@1 0.174/0.222/0.164 vs 0.084/0.123/0.072 (1.80-2.28x).
    torch.manual_seed(SEED)
    L.seed_everything(SEED)
    module = LLaVACaptionCIR(CLIPBackbone("tiny"), TransformerFusion(48), stage2_loss=StaticBankLoss(),
                             optimizer=_opt(5e-4), evaluation=CIRR)
    dm = _dm(data)
    metrics = fit(module, dm, tmp_path, 12, [StageSwitch(switch_epoch=3)])
    assert module.training_stage == 2
    assert_reads_the_text(metrics, module, dm, subset_ratio=1.6, r10_gain=0.12, two_text=0.3)
    assert metrics["val/recall_at_1"] > 1.5 * metrics["val/text_blind/recall_at_1"]


@pytest.mark.slow
def test_procir_mt_align_reads_the_text(data: Path, tmp_path: Path) -> None:
    """ProCIR (MT + Align) on the tiny Qwen3.5, as experiments/demos/procir.yaml but shorter."""
    from lightning_modules import CosineSchedule, ProCIR
    from lightning_modules.backbones import QwenBackbone

    # Seeds 0/1/2: Recall_subset@1 0.412/0.329/0.462 vs text-blind 0.197/0.185/0.200 (1.78-2.31x);
    # R@10 0.609/0.659/0.630 vs 0.424/0.530/0.462 (+0.13 to +0.19); two texts 0.417/0.298/0.366;
    # R@1 0.088/0.091/0.086 vs 0.055/0.062/0.064 (1.34-1.60x).
    torch.manual_seed(SEED)
    L.seed_everything(SEED)
    module = ProCIR(QwenBackbone("tiny"), optimizer=_opt(1e-3), scheduler=lambda o: CosineSchedule(o, warmup_steps=30),
                    evaluation=CIRR)
    dm = _dm(data, train_text="mixed")
    metrics = fit(module, dm, tmp_path, 2, gradient_clip_val=1.0)
    assert_reads_the_text(metrics, module, dm, subset_ratio=1.5, r10_gain=0.08, two_text=None)  # two texts: 0.30-0.42
    # image-text retrieval of the product's own caption: chance is 5 / gallery
    assert metrics["val/t2i_recall_at_5"] > 2 * 5 / metrics["val/synth_studio/gallery_size"]
