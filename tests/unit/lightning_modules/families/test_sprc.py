"""SPRC: the prompt path of the query, its three losses by hand, the multi-view evaluation strategies
against brute force over views and tokens, stage 2 with multi-vector bank entries, its schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules import SPRC, Products, RetrievalEval, StaticBankLoss
from lightning_modules.backbones import Blip2Backbone
from lightning_modules.components.bank import TargetBank
from lightning_modules.families.sprc import OneCycleSchedule, SPRCLoss
from lightning_modules.retrieval.search import maxsim

Q, D = 8, 48  # the tiny BLIP-2's query tokens and feature width


def _model(**kw) -> SPRC:
    torch.manual_seed(0)
    return SPRC(Blip2Backbone("tiny"), **kw)


def _batch(n: int = 4) -> dict:
    torch.manual_seed(1)
    return {"source_images": torch.randn(n, 3, 3, 64, 64),
            "source_mask": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]][:n], dtype=torch.bool),
            "target_images": torch.randn(n, 2, 3, 64, 64),
            "target_mask": torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]][:n], dtype=torch.bool),
            "text": ["make it red", "add a pocket", "make it blue", "add long sleeves"][:n],
            "target_id": [f"t{i}" for i in range(n)]}


def _one(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image[None, None], torch.ones(1, 1, dtype=torch.bool)


# -- (a) the prompt path ---------------------------------------------------------------------------
def test_the_reference_image_reaches_the_query_through_the_sentence_level_prompt() -> None:
    model = _model().eval()
    backbone = model.backbone
    torch.manual_seed(2)
    images = torch.randn(2, 1, 3, 64, 64)
    same_text = {"source_images": images, "source_mask": torch.ones(2, 1, dtype=torch.bool),
                 "text": ["make it red", "make it red"]}
    twice = {**same_text, "source_images": images[:1].expand(2, -1, -1, -1, -1)}
    with torch.no_grad():
        q = model.encode_query(same_text)[:, 0]
        q_twice = model.encode_query(twice)[:, 0]
        ids, mask = backbone.tokenize(same_text["text"])
        prompt = backbone.sentence_prompt(*backbone.view_memory(images, same_text["source_mask"]), ids, mask)
        branch = backbone.text_branch()
        fused = branch.fuse(prompt, ids, mask)
        ablated = branch.fuse(torch.zeros_like(prompt), ids, mask)
        swapped = branch.fuse(prompt.flip(0), ids, mask)
    assert (q_twice[0] - q_twice[1]).abs().max() < 1e-6  # same image and text: same query
    assert (q[0] - q[1]).abs().max() > 1e-5  # same text, another reference image: another query
    assert torch.allclose(q, fused, atol=1e-6)  # the query is the [prompt; text] feature
    assert (fused - ablated).abs().max() > 1e-3  # without the prompt the text alone is left
    assert torch.allclose(swapped, fused.flip(0), atol=1e-6)  # the image acts only through the prompt


# -- (b) the loss by hand --------------------------------------------------------------------------
def _ce_by_hand(queries: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    b, k = targets.shape[:2]
    total = 0.0
    for i in range(b):
        logits = [max(float(queries[i] @ targets[j, t]) for t in range(k) if not math.isnan(float(targets[j, t, 0])))
                  / temperature for j in range(b)]
        total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    return total / b


def test_sprc_loss_by_hand() -> None:
    torch.manual_seed(0)
    b, k, d, q, h = 3, 4, 5, 4, 6
    query, relative = F.normalize(torch.randn(b, d), dim=-1), F.normalize(torch.randn(b, d), dim=-1)
    targets = F.normalize(torch.randn(b, k, d), dim=-1)
    targets[1, 3] = torch.nan  # a padded token never scores
    prompt, tokens = torch.randn(b, q, h, requires_grad=True), torch.randn(q, h, requires_grad=True)
    out = SPRCLoss(temperature=0.1, rtc_weight=0.3, align_weight=0.7)(query, targets, relative, prompt, tokens)
    itc, rtc = _ce_by_hand(query, targets, 0.1), _ce_by_hand(relative, targets, 0.1)
    align = sum((float(prompt[i, :, j].mean()) - float(tokens[:, j].mean())) ** 2 for i in range(b) for j in range(h))
    align /= b * h
    assert out["itc"].item() == pytest.approx(itc, rel=1e-5) and out["rtc"].item() == pytest.approx(rtc, rel=1e-5)
    assert out["align"].item() == pytest.approx(align, rel=1e-5)
    assert out["loss"].item() == pytest.approx(itc + 0.3 * rtc + 0.7 * align, rel=1e-5)
    out["align"].backward()
    assert prompt.grad is not None and tokens.grad is None  # the learnable prompt is the fixed target
    plain = SPRCLoss(rtc_weight=0.0, align_weight=0.0)(query, targets)
    assert set(plain) == {"itc", "loss"} and plain["loss"].item() == pytest.approx(_ce_by_hand(query, targets, 0.07),
                                                                                    rel=1e-5)


def test_model_terms_use_the_fused_query_the_prompted_text_and_the_generated_prompt() -> None:
    model = _model().eval()  # no dropout: the passes can be repeated exactly
    batch = _batch()
    backbone = model.backbone
    with torch.no_grad():
        pair = model.embed_pair(batch)
        terms = model.training_terms(pair, batch)
        ids, mask = backbone.tokenize(batch["text"])
        prompt = backbone.sentence_prompt(*backbone.view_memory(batch["source_images"], batch["source_mask"]),
                                          ids, mask)
        relative = backbone.text_branch().text_feature(ids, mask, prefix=model.prompt_tokens)
        target = backbone.target_tokens(*backbone.view_memory(batch["target_images"], batch["target_mask"]))
    assert torch.allclose(pair.query, backbone.text_branch().fuse(prompt, ids, mask), atol=1e-6)
    assert torch.allclose(pair.target, target, atol=1e-6) and pair.target.shape == (4, Q, D)
    temperature = float(model.loss.temp)
    assert terms["itc"].item() == pytest.approx(_ce_by_hand(pair.query, target, temperature), rel=1e-4)
    assert terms["rtc"].item() == pytest.approx(_ce_by_hand(relative, target, temperature), rel=1e-4)
    align = F.mse_loss(prompt.mean(1), model.prompt_tokens.mean(0).expand(4, -1)).item()
    assert terms["align"].item() == pytest.approx(align, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(terms["itc"].item() + 0.4 * (terms["rtc"].item() + align), rel=1e-4)


def test_a_training_step_moves_what_sprc_trains() -> None:
    model = _model().train()
    vision = {k: v.clone() for k, v in model.backbone.model.vision_model.state_dict().items()}
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    terms = model.training_terms(model.embed_pair(batch), batch)
    terms["loss"].backward()
    unused = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused  # every trainable tensor takes part (DDP needs no unused-parameter search)
    opt.step()
    moved = {k for k, v in model.named_parameters() if k in before and not torch.equal(v, before[k])}
    assert {"prompt_tokens", "loss.temp", "backbone.model.query_tokens"} <= moved
    assert all(torch.equal(v, vision[k]) for k, v in model.backbone.model.vision_model.state_dict().items())
    assert model.variant_switches() == {"two_stage": False, "rtc": True, "align": True, "frozen_vision": True,
                                        "views": "joint"}


# -- (c) multi-view evaluation against brute force -------------------------------------------------
def test_meanpool_and_maxsim_scores_are_the_brute_force_definitions() -> None:
    model = _model(view_strategy="joint").eval()
    batch = _batch()
    targets = Products(batch["target_images"], batch["target_mask"])
    src, tgt = batch["source_mask"], batch["target_mask"]
    with torch.no_grad():
        per_q = [[model.encode_query({"source_images": _one(batch["source_images"][b, v])[0],
                                      "source_mask": _one(batch["source_images"][b, v])[1],
                                      "text": [batch["text"][b]]})[0, 0] for v in range(3) if src[b, v]]
                 for b in range(4)]
        per_t = [[model.encode_target(Products(*_one(batch["target_images"][b, w])))[0] for w in range(2)
                  if tgt[b, w]] for b in range(4)]
        scores = {}
        for strategy in ("meanpool", "maxsim"):
            model.view_strategy = strategy
            query, target = model.encode_query(batch), model.encode_target(targets)
            scores[strategy] = maxsim(query, target)
            assert target.shape[1] == (Q if strategy == "meanpool" else 5 * Q)  # the same K in every batch
    for i in range(4):
        q_mean = F.normalize(torch.stack(per_q[i]).mean(0), dim=-1)
        for j in range(4):
            t_mean = F.normalize(torch.stack(per_t[j]).mean(0), dim=-1)  # token by token over the views
            mean = max(float(q_mean @ t_mean[k]) for k in range(Q))
            best = max(float(qv @ tw[k]) for qv in per_q[i] for tw in per_t[j] for k in range(Q))
            assert scores["meanpool"][i, j].item() == pytest.approx(mean, abs=1e-5)
            assert scores["maxsim"][i, j].item() == pytest.approx(best, abs=1e-5)


def test_joint_evaluation_is_the_training_query_and_target() -> None:
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        pair = model.embed_pair(batch)
        query, target = model.encode_query(batch), model.encode_target(Products.targets_of(batch))
    assert query.shape == (4, 1, D) and torch.allclose(query[:, 0], pair.query, atol=1e-6)
    assert torch.allclose(target, pair.target, atol=1e-6)


def test_configuration_problems_are_reported_together() -> None:
    with pytest.raises(ValueError, match=r"model\.init_args: evaluation\.backend=faiss.*max_text_length=125"):
        SPRC(Blip2Backbone("tiny", max_text_length=125), evaluation=RetrievalEval(backend="faiss"))
    with pytest.raises(ValueError, match=r"loss\.init_args: temperature=0.*rtc_weight=-1"):
        SPRCLoss(temperature=0.0, rtc_weight=-1.0)


# -- (d) stage 2 with multi-vector targets ---------------------------------------------------------
def _token_score(query: torch.Tensor, entry: torch.Tensor) -> float:
    return max(float(query @ tok) for tok in entry if not math.isnan(float(tok[0])))


def test_static_bank_with_multi_vector_entries_by_brute_force() -> None:
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(5, 3, 4), dim=-1)
    emb[2, 2] = torch.nan  # a padded token
    cats = ["dress", "dress", "dress", "dress", "skirt"]
    attrs = [{"colour": "red"}, {"colour": "blue"}, {"colour": "green"}, {"colour": "red"}, {"colour": "red"}]
    ids = ["a", "b", "c", "d", "e"]
    bank = TargetBank(emb, ids, cats, attrs, hard_negatives=2)
    # Hard negatives: same category, other attributes, by the normalised mean of the real tokens.
    summary = [F.normalize(torch.stack([t for t in e if not t.isnan().any()]).mean(0), dim=0) for e in emb]
    for row in range(5):
        allowed = [j for j in range(5) if j != row and cats[j] == cats[row] and attrs[j] != attrs[row]]
        expected = sorted(allowed, key=lambda j: -float(summary[row] @ summary[j]))[:2]
        assert [j for j in bank.hard[row].tolist() if j >= 0] == expected
    query = F.normalize(torch.randn(2, 4), dim=-1)
    positive = F.normalize(torch.randn(2, 3, 4), dim=-1)  # the training-mode targets of "a" and "c"
    tau = 0.5
    out = StaticBankLoss(temperature=tau, hard_weight=0.3)(query, positive, bank, ["a", "c"])
    bank_ce, hard_ce = 0.0, 0.0
    for i, row in enumerate([0, 2]):
        pos = _token_score(query[i], positive[i]) / tau
        others = [_token_score(query[i], emb[j]) / tau for j in range(5) if j != row]
        hard = [_token_score(query[i], emb[j]) / tau for j in bank.hard[row].tolist() if j >= 0]
        bank_ce += -pos + math.log(math.exp(pos) + sum(math.exp(x) for x in others))
        hard_ce += -pos + math.log(math.exp(pos) + sum(math.exp(x) for x in hard))
    assert out["bank"].item() == pytest.approx(bank_ce / 2, rel=1e-5)
    assert out["hard"].item() == pytest.approx(hard_ce / 2, rel=1e-5)
    assert out["loss"].item() == pytest.approx((bank_ce + 0.3 * hard_ce) / 2, rel=1e-5)


def _gallery(n: int = 6) -> dict:
    torch.manual_seed(4)
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[::2, 1] = False
    return {"images": torch.randn(n, 2, 3, 64, 64), "mask": mask,
            "meta": [{"product_id": f"t{i}", "category": "dress", "attributes": {"colour": str(i % 3)}}
                     for i in range(n)]}


def test_stage2_freezes_blip2_and_trains_a_copy_of_the_text_passes() -> None:
    model = _model(stage2_loss=StaticBankLoss(), view_strategy="maxsim")
    model.enter_stage2()
    bank = model.build_bank([_gallery()], hard_negatives=2)
    assert bank.embeddings.shape == (6, Q, D)  # as training scores targets, whatever the view strategy
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.prompt_tokens.requires_grad and not model.loss.temp.requires_grad
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith("query_branch.") for k in trainable)
    assert not any("crossattention" in k or "_query" in k for k in trainable)  # never used by text passes
    model.train()
    assert not model.backbone.training and model.query_branch.training
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    branch = {k: v.clone() for k, v in model.query_branch.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pair, terms = model.training_forward(_batch())
    query = pair.query
    assert query.shape == (4, D) and {"bank", "hard", "loss"} <= set(terms)
    terms["loss"].backward()
    opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in model.backbone.state_dict().items())
    assert any(not torch.equal(v, branch[k]) for k, v in model.query_branch.state_dict().items())
    # A stage-2 checkpoint loads into a fresh model: the copy is re-created before the weights arrive.
    fresh = _model(stage2_loss=StaticBankLoss())
    fresh.on_load_checkpoint({"cir_training_stage": 2})
    fresh.load_state_dict(model.state_dict())
    assert fresh.training_stage == 2 and torch.equal(fresh.query_branch.projection.weight,
                                                     model.query_branch.projection.weight)


# -- the schedule ----------------------------------------------------------------------------------
@pytest.mark.parametrize("total,pct", [(100, 0.05), (37, 0.3)])
def test_one_cycle_schedule_matches_torch(total: int, pct: float) -> None:
    def optimizer() -> torch.optim.AdamW:
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5, betas=(0.9, 0.98))

    ref_opt, opt = optimizer(), optimizer()
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=2e-5, total_steps=total, pct_start=pct,
                                              div_factor=100.0)
    mine = OneCycleSchedule(opt, pct_start=pct, div_factor=100.0)
    mine.total_steps = total  # as the model fills it in from the Trainer, after construction
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9), step
        assert opt.param_groups[0]["betas"] == pytest.approx(ref_opt.param_groups[0]["betas"]), step
        ref_opt.step()
        opt.step()
        if step < total - 1:
            ref.step()
            mine.step()


def test_stage_switch_inside_a_run(small_data, tmp_path) -> None:
    """StageSwitch at epoch 1 of a one-device run: the bank holds every training product's token set and
    only the copy of the text passes moves from then on."""
    import lightning as L

    from callbacks.stage_switch import StageSwitch
    from datamodules import ShardDataModule

    model = _model(stage2_loss=StaticBankLoss())
    seen = {}

    class AtSwitch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if pl_module.training_stage == 2 and not seen:
                seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    dm = ShardDataModule(str(small_data), batch_size=4, eval_batch_size=16, num_workers=0)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[StageSwitch(switch_epoch=1, hard_negatives=2), AtSwitch()])
    trainer.fit(model, datamodule=dm)
    assert model.training_stage == 2 and model.bank is not None
    assert model.bank.embeddings.shape == (dm.manifest["splits"]["train"]["products"], Q, D)
    end = model.state_dict()
    assert all(torch.equal(seen[k], end[k]) for k in end if k.startswith("backbone."))
    assert any(not torch.equal(seen[k], end[k]) for k in end if k.startswith("query_branch."))
