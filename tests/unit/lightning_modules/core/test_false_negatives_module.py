"""Every training path hands the batch's product ids to its losses: ProCIR's L_cir and L_doc mask
duplicate targets and L_src duplicate sources; SPRC and LLaVA-caption mask duplicate targets; the
module logs the masked share (``train/masked_negatives``), the same with GradCache as without."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.false_negatives import sprc_contrast_by_hand, symmetric_by_hand
from support.grad_cache import batch, build, max_difference, step

from lightning_modules import CLIP4CIR, SPRC, LLaVACaptionCIR, ProCIR
from lightning_modules.backbones import Blip2Backbone, CLIPBackbone, QwenBackbone
from lightning_modules.core import TrainingPair

TARGETS = ["a", "b", "a", "c", "b", "d"]
SOURCES = ["s1", "s2", "s3", "s3", "s4", "s5"]


def _ids(n: int = 6) -> dict:
    return {"target_id": TARGETS[:n], "source_id": SOURCES[:n], "dataset": ["gen"] * n, "text": ["x"] * n}


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_procir_masks_targets_in_cir_and_doc_and_sources_in_src() -> None:
    model = ProCIR(QwenBackbone("tiny"))
    q, d, t_tgt, s, t_src = (_unit(6, 8, seed) for seed in range(5))
    pair = TrainingPair(q, d, {"source": s, "target_caption": t_tgt, "source_caption": t_src})
    terms = model.training_terms(pair, _ids())
    assert float(terms["cir"]) == pytest.approx(symmetric_by_hand(q, d, TARGETS, 0.07), rel=1e-5)
    assert float(terms["doc"]) == pytest.approx(symmetric_by_hand(d, t_tgt, TARGETS, 0.07), rel=1e-5)
    assert float(terms["src"]) == pytest.approx(symmetric_by_hand(s, t_src, SOURCES, 0.07), rel=1e-5)
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    model.log_masked_negatives("train", 6)
    # cir and doc: 4 masked per direction ("a" and "b" in 2 rows each) of 6 × 5; src: 2 ("s3").
    assert logged["train/masked_negatives"] == pytest.approx((4 * 4 + 2 * 2) / (6 * 30))


def test_sprc_and_llava_caption_pass_the_target_ids() -> None:
    torch.manual_seed(0)
    sprc = SPRC(Blip2Backbone("tiny"))
    q, rel = _unit(6, 8, 0), _unit(6, 8, 1)
    targets = F.normalize(torch.randn(6, 3, 8), dim=-1)
    pair = TrainingPair(q, targets, {"relative": rel, "prompt": torch.randn(6, *sprc.prompt_tokens.shape)})
    terms = sprc.training_terms(pair, _ids())
    tau = sprc.loss.temperature
    assert float(terms["itc"]) == pytest.approx(sprc_contrast_by_hand(q, targets, TARGETS, tau), rel=1e-5)
    assert float(terms["rtc"]) == pytest.approx(sprc_contrast_by_hand(rel, targets, TARGETS, tau), rel=1e-5)

    llava = LLaVACaptionCIR(CLIPBackbone("tiny"), synthetic_negatives=0, augmented_negatives=0)
    d = _unit(6, 8, 2)
    terms = llava.training_terms(TrainingPair(q, d), _ids())
    assert float(terms["in_batch"]) == pytest.approx(symmetric_by_hand(q, d, TARGETS, llava.loss.temperature),
                                                     rel=1e-5)


def test_augmented_negatives_are_never_the_rows_own_product() -> None:
    model = LLaVACaptionCIR(CLIPBackbone("tiny"), augmented_negatives=5)
    keys = _unit(6, 8, 3)
    target = _unit(6, 8, 4)
    data = {**_ids(), "target_caption": [f"caption {i}" for i in range(6)]}
    chosen, valid = model.augmented_targets(data, target, keys)
    for i in range(6):
        for j in range(5):
            if valid[i, j]:
                k = next(r for r in range(6) if torch.equal(chosen[i, j], target[r]))
                assert TARGETS[k] != TARGETS[i]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["clip4cir", "procir"])
def test_grad_cache_passes_the_ids_too(case: str) -> None:
    data = batch(build(case, None), 16, seed=7)
    data["target_id"][1] = data["target_id"][5] = data["target_id"][0]
    data["source_id"][3] = data["source_id"][2]
    plain, cached = step(case, None, data), step(case, 4, data)
    # Per direction of each term: "a" in 3 rows × 2 copies masked of 16 × 15; ProCIR's L_src: 2.
    expected = 6 / 240 if case == "clip4cir" else (4 * 6 + 2 * 2) / (6 * 240)
    assert plain["logged"]["train/masked_negatives"] == pytest.approx(expected)
    assert cached["logged"]["train/masked_negatives"] == pytest.approx(expected)
    for name, value in plain["logged"].items():
        assert cached["logged"][name] == pytest.approx(value, abs=1e-5), name
    assert max_difference(plain["params"], cached["params"]) < 1e-5


def test_model_step_logs_the_masked_share() -> None:
    torch.manual_seed(0)
    model = CLIP4CIR(CLIPBackbone("tiny"))
    n = 4
    data = {"source_images": torch.randn(n, 1, 3, 64, 64), "source_mask": torch.ones(n, 1, dtype=torch.bool),
            "target_images": torch.randn(n, 1, 3, 64, 64), "target_mask": torch.ones(n, 1, dtype=torch.bool),
            "text": ["make it red"] * n, "target_id": ["a", "b", "a", "c"], "source_id": ["s"] * n,
            "dataset": ["gen"] * n}
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    model.model_step(data, "train")
    assert logged["train/masked_negatives"] == pytest.approx(2 / 12)
    logged.clear()
    model.model_step({k: v for k, v in data.items() if k != "target_id"}, "train")  # no ids: no masking
    assert "train/masked_negatives" not in logged
