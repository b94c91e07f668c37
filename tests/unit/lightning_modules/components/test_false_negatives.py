"""False negatives: a candidate that is the row's positive product again is masked from its negatives,
in every contrastive loss. Each loss is checked against a reference written with explicit loops
(math.log/exp) on batches with planted duplicate targets; without duplicates the loss is exactly the
unmasked one. The 2-process versions are in ``test_false_negatives_gloo.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.false_negatives import ce, dot, keys_of, sprc_contrast_by_hand, symmetric_by_hand, unit

from lightning_modules.components import HybridNegativesLoss, MinedNegativesLoss, StaticBankLoss, SymmetricInfoNCE
from lightning_modules.components.bank import TargetBank
from lightning_modules.components.false_negatives import false_negative_mask, product_keys
from lightning_modules.families.sprc import SPRCLoss

TAU = 0.2


DUPLICATES = ["a", "b", "a", "c", "b", "a"]


def test_the_mask_is_same_product_and_never_the_positive() -> None:
    keys = keys_of(["a", "b", "a"])
    mask = false_negative_mask(keys, keys, torch.arange(3))
    assert mask.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    # Identity is (dataset, id): the same id in another dataset is another product.
    other = product_keys(["a", "a"], ["fashioniq", "fashionmv"])
    assert not false_negative_mask(other, other, torch.arange(2)).any()


def test_infonce_masks_planted_duplicates_in_both_directions() -> None:
    torch.manual_seed(0)
    q, d = torch.randn(6, 5), torch.randn(6, 5)
    loss = SymmetricInfoNCE(temperature=TAU, learnable_temperature=False)
    got = loss(q, d, ids=keys_of(DUPLICATES))
    assert float(got) == pytest.approx(symmetric_by_hand(q, d, DUPLICATES), rel=1e-6)
    assert float(got) != pytest.approx(symmetric_by_hand(q, d, None), rel=1e-3)  # the mask mattered
    masked, negatives = loss.pop_masked_negatives()
    # a: 3 rows, each with 2 copies; b: 2 rows with 1 each → 8 masked per direction of 6·5 negatives.
    assert (int(masked), int(negatives)) == (16, 60)
    assert loss.pop_masked_negatives() is None  # read once per step


def test_without_duplicates_the_loss_is_the_old_one_exactly() -> None:
    torch.manual_seed(1)
    q, d = torch.randn(8, 5), torch.randn(8, 5)
    loss = SymmetricInfoNCE(temperature=0.07)
    assert torch.equal(loss(q, d, ids=keys_of([f"p{i}" for i in range(8)])), loss(q, d))
    assert float(loss(q, d).detach()) == pytest.approx(symmetric_by_hand(q, d, None, 0.07), rel=1e-6)
    sprc = SPRCLoss(temperature=0.1, rtc_weight=0.0, align_weight=0.0)
    t = torch.randn(8, 3, 5)
    assert torch.equal(sprc(q, t, ids=keys_of([f"p{i}" for i in range(8)]))["loss"], sprc(q, t)["loss"])


def test_hybrid_in_batch_term_masks_duplicates() -> None:
    torch.manual_seed(2)
    q, d = torch.randn(6, 5), torch.randn(6, 5)
    loss = HybridNegativesLoss(temperature=TAU, learnable_temperature=False)
    terms = loss.terms(q, d, ids=keys_of(DUPLICATES))
    assert float(terms["in_batch"]) == pytest.approx(symmetric_by_hand(q, d, DUPLICATES), rel=1e-6)
    assert float(loss(q, d, ids=keys_of(DUPLICATES))) == pytest.approx(float(terms["in_batch"]), rel=1e-6)


def test_mined_negatives_equal_to_the_target_are_masked() -> None:
    torch.manual_seed(3)
    q, t, n = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 2, 5)
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    # Row 0's second negative is its own target product; row 1's only negative too (the row drops).
    names = [["x", "a"], ["b", ""], ["y", "z"]]
    ids = keys_of(["a", "b", "c"])
    neg = torch.stack([keys_of(row) for row in names])
    got = MinedNegativesLoss(temperature=TAU)(q, t, n, valid, ids=ids, negative_ids=neg)
    qs, ts, ns = unit(q), unit(t), [unit(n[i]) for i in range(3)]
    rows = [[dot(qs[0], ts[0]), dot(qs[0], ns[0][0])], [dot(qs[2], ts[2]), dot(qs[2], ns[2][0]), dot(qs[2], ns[2][1])]]
    expected = sum(ce(r, 0, set(), TAU) for r in rows) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)
    unmasked = MinedNegativesLoss(temperature=TAU)(q, t, n, valid)
    assert torch.equal(MinedNegativesLoss(temperature=TAU)(q, t, n, valid, ids=ids, negative_ids=keys_of(
        ["u", "v", "w", "", "s", "r"]).view(3, 2)), unmasked)


def test_bank_entries_of_the_positive_product_are_never_negatives() -> None:
    torch.manual_seed(4)
    emb = F.normalize(torch.randn(5, 4), dim=-1)
    ids = ["a", "b", "a", "c", "d"]  # "a" twice: a duplicate at another position
    attrs = [{"colour": "red"}, {"colour": "blue"}, {"colour": "green"}, {"colour": "red"}, {"colour": "pink"}]
    bank = TargetBank(emb, ids, ["dress"] * 5, attrs, hard_negatives=4)
    query, target = torch.randn(2, 4), torch.randn(2, 4)
    loss = StaticBankLoss(temperature=TAU, hard_weight=0.5)
    out = loss(query, target, bank, ["a", "c"])
    qs, ts, bs = unit(query), unit(target), unit(emb)
    bank_ce = hard_ce = 0.0
    for i, name in enumerate(["a", "c"]):
        pos = dot(qs[i], ts[i])
        others = [dot(qs[i], bs[j]) for j in range(5) if ids[j] != name]
        bank_ce += ce([pos, *others], 0, set(), TAU)
        row = bank.rows([name]).item()
        hard = [dot(qs[i], bs[j]) for j in bank.hard[row].tolist() if j >= 0 and ids[j] != name]
        hard_ce += ce([pos, *hard], 0, set(), TAU)
    assert 0 in bank.hard[2].tolist()  # the planted copy would be a hard negative of "a"
    assert float(out["bank"]) == pytest.approx(bank_ce / 2, rel=1e-5)
    assert float(out["hard"]) == pytest.approx(hard_ce / 2, rel=1e-5)
    masked, _ = loss.pop_masked_negatives()
    # Counted: duplicates only, the copy of "a" in the bank term and among its hard ones (each row's own
    # bank entry is masked too, since the positive is scored from the batch, but is no duplicate).
    assert int(masked) == 1 + 1


def test_sprc_masks_duplicate_targets_in_itc_and_rtc() -> None:
    torch.manual_seed(5)
    q, rel = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    targets = F.normalize(torch.randn(6, 3, 4), dim=-1)
    targets[1, 2] = torch.nan  # a padding token
    loss = SPRCLoss(temperature=TAU, rtc_weight=0.4, align_weight=0.0)
    out = loss(q, targets, relative=rel, ids=keys_of(DUPLICATES))
    itc, rtc = sprc_contrast_by_hand(q, targets, DUPLICATES, TAU), sprc_contrast_by_hand(rel, targets, DUPLICATES, TAU)
    assert float(out["itc"]) == pytest.approx(itc, rel=1e-5)
    assert float(out["rtc"]) == pytest.approx(rtc, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(itc + 0.4 * rtc, rel=1e-5)
    assert float(loss(q, targets, relative=rel)["itc"]) == pytest.approx(
        sprc_contrast_by_hand(q, targets, None, TAU), rel=1e-5)
