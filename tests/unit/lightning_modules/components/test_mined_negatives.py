"""Mined hard negatives in training: the loss term by hand, and the negatives' embeddings equal
each product embedded on its own (tensor views and Qwen's per-view lists)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.procir import views

from lightning_modules import CLIP4CIR, MinedNegativesLoss, ProCIR
from lightning_modules.backbones import CLIPBackbone, QwenBackbone
from lightning_modules.core import Products


def _by_hand(q: torch.Tensor, items: list[list[torch.Tensor]], tau: float) -> float:
    """Mean over queries with at least one negative of -log softmax(positive) over [pos, negs]."""
    total, rows = 0.0, 0
    for i, row in enumerate(items):
        if len(row) < 2:
            continue
        scores = [float(F.normalize(q[i], dim=0) @ F.normalize(t, dim=0)) / tau for t in row]
        total -= scores[0] - math.log(sum(math.exp(s) for s in scores))
        rows += 1
    return total / rows


def test_the_loss_equals_the_hand_computed_cross_entropy() -> None:
    torch.manual_seed(0)
    q, t, n = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 2, 5)
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    got = MinedNegativesLoss(temperature=0.1)(q, t, n, valid)
    items = [[t[i]] + [n[i, j] for j in range(2) if valid[i, j]] for i in range(3)]
    assert float(got) == pytest.approx(_by_hand(q, items, 0.1), rel=1e-5)
    # Multi-vector targets (SPRC's token sets) score by their best token, NaN padding never counts.
    tt, nn_ = torch.randn(3, 4, 5), torch.randn(3, 2, 4, 5)
    tt[0, 3] = torch.nan
    best = [[max((tok for tok in item if not tok.isnan().any()),
                 key=lambda tok: float(F.normalize(q[i], dim=0) @ F.normalize(tok, dim=0)))
             for item in [tt[i]] + [nn_[i, j] for j in range(2) if valid[i, j]]] for i in range(3)]
    got = MinedNegativesLoss(temperature=0.1)(q, tt, nn_, valid)
    assert float(got) == pytest.approx(_by_hand(q, best, 0.1), rel=1e-5)
    none = MinedNegativesLoss()(q.requires_grad_(), t, n, torch.zeros(3, 2, dtype=torch.bool))
    assert float(none) == 0.0 and none.requires_grad


def test_clip4cir_embeds_each_mined_negative_as_its_own_product() -> None:
    torch.manual_seed(0)
    model = CLIP4CIR(CLIPBackbone("tiny"), mined_negatives=MinedNegativesLoss())
    b, k, v = 3, 2, 2
    neg = torch.randn(b, k, v, 3, 64, 64)
    mask = torch.ones(b, k, v, dtype=torch.bool)
    mask[0, 1, 1] = False
    mask[2, 1] = False  # a missing negative
    batch = {"source_images": torch.randn(b, 1, 3, 64, 64), "source_mask": torch.ones(b, 1, dtype=torch.bool),
             "target_images": torch.randn(b, 1, 3, 64, 64), "target_mask": torch.ones(b, 1, dtype=torch.bool),
             "text": ["make it red"] * b, "negative_images": neg, "negative_mask": mask}
    model.eval()
    with torch.no_grad():
        pair = model.embed_with_mined(batch)
        terms = model.terms_with_mined(pair, batch)
    assert pair.extras["mined_valid"].tolist() == [[True, True], [True, True], [True, False]]
    for i in range(b):
        for j in range(k):
            if mask[i, j].any():
                alone = model.encode_target(Products(neg[i, j][None], mask[i, j][None]))[0]
                assert torch.allclose(pair.extras["mined"][i, j], alone, atol=1e-5)
    expected = MinedNegativesLoss()(pair.query, pair.target, pair.extras["mined"], pair.extras["mined_valid"])
    assert float(terms["mined"]) == pytest.approx(float(expected))
    assert float(terms["loss"]) == pytest.approx(float(model.training_terms(pair, batch)["loss"] + expected))
    with pytest.raises(ValueError, match="data.init_args.hard_negatives"):
        model.embed_with_mined({k_: v_ for k_, v_ in batch.items() if not k_.startswith("negative")})


def test_procir_embeds_mined_negatives_from_per_view_lists() -> None:
    torch.manual_seed(0)
    backbone = QwenBackbone("tiny")
    model = ProCIR(backbone, align=False, mined_negatives=MinedNegativesLoss()).eval()
    negatives = [[views(backbone, 2, 1), views(backbone, 1, 2)], [views(backbone, 1, 3), []]]
    batch = {"source_images": [views(backbone, 1, 4), views(backbone, 2, 5)],
             "target_images": [views(backbone, 1, 6), views(backbone, 1, 7)], "text": ["a", "b"],
             "negative_images": negatives}
    with torch.no_grad():
        pair = model.embed_with_mined(batch)
        alone = model.encode_target(Products([negatives[0][1]]))[0]
    assert pair.extras["mined_valid"].tolist() == [[True, True], [True, False]]
    assert torch.allclose(pair.extras["mined"][0, 1], alone, atol=1e-5)
