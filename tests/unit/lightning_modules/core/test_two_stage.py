"""Stage 2: frozen target encoder, static bank, hard negatives; the stage switch and stage chaining."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.stage_switch import StageSwitch
from datamodules import ShardDataModule
from lightning_modules import CLIP4CIR, Combiner, StaticBankLoss
from lightning_modules.backbones import CLIPBackbone
from lightning_modules.components.bank import TargetBank

ROOT = Path(__file__).resolve().parents[4]


def _bank() -> TargetBank:
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [0.9, -0.1]])
    attrs = [{"colour": "red"}, {"colour": "blue"}, {"colour": "green"}, {"colour": "red"}, {"colour": "red"}]
    cats = ["dress", "dress", "dress", "dress", "skirt"]
    return TargetBank(emb, ["a", "b", "c", "d", "e"], cats, attrs, hard_negatives=2)


def test_hard_negatives_share_category_differ_in_attributes_most_similar_first() -> None:
    bank = _bank()
    # For "a" (red dress): same category with another colour are b, c (d is red, e is a skirt);
    # b is the more similar of the two.
    assert bank.hard[0].tolist() == [1, 2]
    assert bank.hard[4].tolist() == [-1, -1]  # the only skirt: no hard negative
    # Without attributes (FashionIQ) any other product of the category qualifies.
    plain = TargetBank(bank.embeddings, bank.ids, bank.categories, [{}] * 5, hard_negatives=1)
    assert plain.hard[0].tolist() == [1]  # b: the most similar other dress (e is a skirt)
    assert plain.hard[3].tolist() == [2]  # for d, no attributes to match: c, the most similar dress


def test_static_bank_loss_by_hand() -> None:
    bank = _bank()
    tau = 0.5
    q = torch.tensor([[0.6, 0.8]])
    t = torch.tensor([[1.0, 0.0]])  # target "a"
    out = StaticBankLoss(temperature=tau, hard_weight=0.3)(q, t, bank, ["a"])
    s_pos = 0.6
    s_others = [0.6 * 0.8 + 0.8 * 0.6, 0.6 * 0.6 + 0.8 * 0.8, 0.8, 0.6 * 0.9 - 0.8 * 0.1]
    s_others = [x / math.hypot(0.9, -0.1) if i == 3 else x for i, x in enumerate(s_others)]
    expected_bank = -s_pos / tau + math.log(math.exp(s_pos / tau) + sum(math.exp(x / tau) for x in s_others))
    hard = s_others[:2]  # b, c
    expected_hard = -s_pos / tau + math.log(math.exp(s_pos / tau) + sum(math.exp(x / tau) for x in hard))
    assert out["bank"].item() == pytest.approx(expected_bank, rel=1e-5)
    assert out["hard"].item() == pytest.approx(expected_hard, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_bank + 0.3 * expected_hard, rel=1e-5)


def _module(**kw) -> CLIP4CIR:
    torch.manual_seed(0)
    return CLIP4CIR(CLIPBackbone("tiny"), Combiner(48), stage2_loss=StaticBankLoss(), **kw)


class _Snapshot(L.Callback):
    """Parameters at the first stage-2 step and at the end of training."""

    def __init__(self) -> None:
        self.at_switch: dict[str, torch.Tensor] = {}
        self.losses: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.training_stage == 2 and not self.at_switch:
            self.at_switch = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(sorted(k for k in trainer.callback_metrics if k.startswith("train/")))


@pytest.mark.slow
def test_switch_freezes_the_target_encoder_and_trains_against_the_bank(small_data: Path, tmp_path: Path) -> None:
    module = _module()
    snap = _Snapshot()
    dm = ShardDataModule(str(small_data), batch_size=8, num_workers=0, eval_batch_size=32)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, callbacks=[StageSwitch(switch_epoch=1), snap],
                        default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(module, datamodule=dm)
    assert module.training_stage == 2 and module.bank is not None
    assert len(module.bank) == dm.manifest["splits"]["train"]["products"]
    end = module.state_dict()
    vision = [k for k in end if k.startswith("backbone.model.vision_model") or "visual_projection" in k]
    text = [k for k in end if k.startswith("backbone.model.text_model") and k.endswith("weight")]
    assert vision and all(torch.equal(snap.at_switch[k], end[k]) for k in vision)
    assert any(not torch.equal(snap.at_switch[k], end[k]) for k in text + ["fusion.output.weight"])
    assert not any(p.requires_grad for m in module.target_encoder() for p in m.parameters())
    assert all(not m.training for m in module.target_encoder())
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for m in module.target_encoder() for p in m.parameters()}
    assert "train/bank_loss" in snap.losses[-1] and "train/hard_loss" in snap.losses[-1]
    assert "train/bank_loss" not in snap.losses[0]


@pytest.mark.slow
def test_stage1_checkpoint_initialises_a_separate_stage2_run(small_data: Path, tmp_path: Path) -> None:
    stage1 = _module()
    dm = ShardDataModule(str(small_data), batch_size=8, num_workers=0)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                        default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(stage1, datamodule=dm)
    ckpt = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)

    stage2 = _module(training_stage=2, init_checkpoint=str(ckpt))
    seen = {}

    class Check(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer2 = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                         default_root_dir=tmp_path, enable_progress_bar=False,
                         callbacks=[StageSwitch(switch_epoch=0), Check()])
    trainer2.fit(stage2, datamodule=ShardDataModule(str(small_data), batch_size=8, num_workers=0))
    reference = stage1.state_dict()
    assert all(torch.equal(seen[k], reference[k]) for k in reference if not k.startswith("recall"))
    assert stage2.training_stage == 2 and stage2.bank is not None

    missing = _module(training_stage=2, init_checkpoint=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="experiments/clip4cir/stage1.yaml"):
        L.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path).fit(
            missing, datamodule=ShardDataModule(str(small_data), batch_size=8, num_workers=0))


def test_target_pad_by_hand() -> None:
    from PIL import Image

    from datamodules.batching import TargetPad

    pad = TargetPad(1.25, lambda img: img)
    tall = Image.new("RGB", (100, 200), (255, 0, 0))
    out = pad.pad(tall)
    assert out.size == (160, 200)  # 200 / 1.25 = 160: 30 px of black each side
    assert out.getpixel((10, 100)) == (0, 0, 0) and out.getpixel((80, 100)) == (255, 0, 0)
    square = Image.new("RGB", (100, 110))
    assert pad.pad(square) is square  # already within the ratio


def test_fashioniq_text_forms() -> None:
    import random

    from datamodules.batching import fashioniq_text

    caps = ["is shiny and silver with shorter sleeves.", " fit and flare?"]
    assert fashioniq_text(caps, None) == "Is shiny and silver with shorter sleeves and fit and flare"
    forms = {fashioniq_text(caps, random.Random(s)) for s in range(50)}
    assert forms == {"Is shiny and silver with shorter sleeves and fit and flare",
                     "Fit and flare and is shiny and silver with shorter sleeves",
                     "Is shiny and silver with shorter sleeves", "Fit and flare"}
