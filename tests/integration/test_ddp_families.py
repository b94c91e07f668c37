"""Every family's in-batch negatives are global under DDP (2 gloo processes).

Each rank embeds its half of a batch and computes the family's training terms; with the ranks
connected the way ``RetrievalModule.setup`` connects them (``connect_ranks``), every gathered term
(in-batch InfoNCE; LLaVA-caption CIR's in-batch part of the hybrid loss; ProCIR's L_cir, L_doc and
L_src) averaged over the ranks equals the term of one process holding the whole batch. Without the
connection each rank would only see its own half, which the control below shows gives other values.
"""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image
from support.gloo import run_gloo

from lightning_modules import CLIP4CIR, Combiner, LLaVACaptionCIR, ProCIR, TransformerFusion
from lightning_modules.backbones import CLIPBackbone, QwenBackbone

N = 8
# The terms that score a query against other queries' targets (and so must see every rank's).
GATHERED = {"CLIP4CIR": ("loss",), "LLaVACaptionCIR": ("in_batch",), "ProCIR": ("cir", "doc", "src")}
CAPTIONS = ["a red plain dress", "a blue striped shirt", "a green checked top", "a black printed skirt",
            "a white dotted dress", "a pink plain top", "a grey striped skirt", "a navy checked shirt"]


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "CLIP4CIR":
        return CLIP4CIR(CLIPBackbone("tiny"), Combiner(48)).eval()
    if family == "LLaVACaptionCIR":
        return LLaVACaptionCIR(CLIPBackbone("tiny"), TransformerFusion(48)).eval()
    return ProCIR(QwenBackbone("tiny"), two_stage_dialogue=True, align=True).eval()


def batch(family: str, model: torch.nn.Module, lo: int, hi: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    meta = [{"source": {"long_caption": f"long {c}", "short_caption": c},
             "target": {"long_caption": f"long {CAPTIONS[-1 - i]}", "short_caption": CAPTIONS[-1 - i]}}
            for i, c in enumerate(CAPTIONS)]
    out = {"text": [f"make it number {i}" for i in range(N)], "meta": meta, "target_id": [f"t{i}" for i in range(N)],
           "source_caption": CAPTIONS, "target_caption": CAPTIONS[::-1], "modified_text": [""] * N}
    if family == "ProCIR":
        rng = random.Random(2)
        image = [Image.new("RGB", (64, 96), tuple(rng.randrange(256) for _ in range(3))) for _ in range(2 * N)]
        out["source_images"] = [[model.backbone.image_transform(image[i])] for i in range(N)]
        out["target_images"] = [[model.backbone.image_transform(image[N + i])] for i in range(N)]
    else:
        out.update(source_images=torch.randn(N, 2, 3, 64, 64, generator=gen),
                   source_mask=torch.ones(N, 2, dtype=torch.bool),
                   target_images=torch.randn(N, 1, 3, 64, 64, generator=gen),
                   target_mask=torch.ones(N, 1, dtype=torch.bool))
    return {k: v[lo:hi] for k, v in out.items()}


def terms(family: str, rank: int, world: int) -> tuple[dict[str, float], dict[str, float]]:
    """The gathered terms of this rank's half, with the rank left alone and then connected."""
    model = build(family)
    b = N // world
    data = batch(family, model, rank * b, (rank + 1) * b)
    out = []
    for connect in (False, True):
        if connect:
            model.connect_ranks(rank, world)
        with torch.no_grad():
            found = model.training_terms(model.embed_pair(data), data)
        out.append({k: float(v) for k, v in found.items() if k in GATHERED[family]})
    return out[0], out[1]


FAMILIES = ("CLIP4CIR", "LLaVACaptionCIR", "ProCIR")


def terms_of_rank(rank: int, world: int) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    return {family: terms(family, rank, world) for family in FAMILIES}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, tuple[dict[str, float], dict[str, float]]]]:
    """Every family on 2 gloo processes, spawned once for the module."""
    return run_gloo(terms_of_rank, 2)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_in_batch_negatives_are_global(family: str, two_ranks: list) -> None:
    whole = terms(family, 0, 1)[1]
    assert set(whole) == set(GATHERED[family])
    local, connected = zip(*(rank[family] for rank in two_ranks), strict=True)
    for name, value in whole.items():
        assert sum(r[name] for r in connected) / 2 == pytest.approx(value, abs=1e-4), name
    # Control: ranks left unconnected score only their own half, and the terms come out different.
    assert any(abs(sum(r[n] for r in local) / 2 - v) > 1e-3 for n, v in whole.items())
