"""LLaVA-caption CIR with its query text through BLIP-2 sentence-level prompting instead of CLIP."""

from __future__ import annotations

import pytest
import torch

from lightning_modules import LLaVACaptionCIR, TransformerFusion
from lightning_modules.backbones import Blip2Backbone, CLIPBackbone
from lightning_modules.families.llava_caption import SentencePromptEncoder


def _model(prompted: bool) -> LLaVACaptionCIR:
    torch.manual_seed(0)
    clip = CLIPBackbone("tiny")
    encoder = SentencePromptEncoder(Blip2Backbone("tiny"), dim=48) if prompted else None
    return LLaVACaptionCIR(clip, TransformerFusion(48), query_text_encoder=encoder)


def _batch(n: int = 4) -> dict:
    torch.manual_seed(1)
    captions = ["a red plain dress", "a blue striped shirt", "a green checked top", "a black printed skirt"][:n]
    return {"source_images": torch.randn(n, 2, 3, 64, 64), "source_mask": torch.ones(n, 2, dtype=torch.bool),
            "target_images": torch.randn(n, 1, 3, 64, 64), "target_mask": torch.ones(n, 1, dtype=torch.bool),
            "text": [f"make it variant {i}" for i in range(n)], "source_caption": captions[::-1],
            "target_caption": captions, "target_id": [f"t{i}" for i in range(n)], "modified_text": [""] * n}


def test_the_option_replaces_the_clip_text_feature_by_the_prompted_one() -> None:
    clip_only, prompted = _model(False).eval(), _model(True).eval()
    batch = _batch()
    texts = prompted.query_texts(batch)
    with torch.no_grad():
        image = prompted.backbone.encode_products(batch["source_images"], batch["source_mask"])
        blip = prompted.query_text_encoder.backbone.prompted_query(batch["source_images"], batch["source_mask"], texts)
        expected = prompted.fusion(image, blip)
        clip_query = clip_only.fusion(image, clip_only.backbone.encode_texts(texts))  # the default, unchanged
        got, default = prompted.encode_query(batch), clip_only.encode_query(batch)
        other_views = prompted.encode_query({**batch, "source_images": batch["source_images"].flip(0)})
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(default, clip_query, atol=1e-6)
    assert (got - default).abs().max() > 1e-3  # the option changes the query
    assert (got - other_views).abs().max() > 1e-3
    assert prompted.variant_switches()["query_encoder"] == "blip2_prompt"
    assert clip_only.variant_switches()["query_encoder"] == "clip"


def test_a_training_step_trains_the_prompted_text_encoder() -> None:
    model = _model(True).train()
    encoder = model.query_text_encoder
    qformer = {k: v.clone() for k, v in encoder.backbone.model.qformer.state_dict().items()}
    vision = {k: v.clone() for k, v in encoder.backbone.model.vision_model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    terms = model.training_terms(model.embed_pair(batch), batch)
    assert torch.isfinite(terms["loss"]) and {"in_batch", "loss"} <= set(terms)
    terms["loss"].backward()
    opt.step()
    assert any(not torch.equal(v, qformer[k]) for k, v in encoder.backbone.model.qformer.state_dict().items())
    assert all(torch.equal(v, vision[k]) for k, v in encoder.backbone.model.vision_model.state_dict().items())


def test_a_width_that_does_not_fit_the_fusion_head_is_an_error() -> None:
    encoder = SentencePromptEncoder(Blip2Backbone("tiny"), dim=32)
    assert isinstance(encoder.projection, torch.nn.Linear)
    with pytest.raises(ValueError, match=r"query_text_encoder\.init_args\.dim=32 .* set it to 48"):
        LLaVACaptionCIR(CLIPBackbone("tiny"), TransformerFusion(48), query_text_encoder=encoder)
