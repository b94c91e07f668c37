"""CLIP4CIR's per-view evaluation strategies (the FashionMV paper's single-image baselines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules import Products


def test_clip4cir_per_view_baselines_match_one_view_at_a_time() -> None:
    """The paper's MeanPool/MaxSim for a single-image family: each source view fused with the text
    on its own, each target view embedded on its own, checked against one-view batches."""
    from lightning_modules import CLIP4CIR
    from lightning_modules.backbones import CLIPBackbone

    torch.manual_seed(0)
    backbone = CLIPBackbone("tiny")
    images = torch.rand(2, 3, 3, 64, 64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    text = ["make it red", "add a pocket"]
    one = CLIP4CIR(backbone).eval()
    with torch.no_grad():
        per_q = [[F.normalize(one.encode_query({"source_images": images[b, v][None, None],
                                                "source_mask": torch.ones(1, 1, dtype=torch.bool),
                                                "text": [text[b]]})[0], dim=-1)
                  for v in range(3) if mask[b, v]] for b in range(2)]
        # Target views as the model produces them: raw (unnormalised) CLIP image features.
        per_t = [[backbone.encode_images(images[b, v][None])[0] for v in range(3) if mask[b, v]] for b in range(2)]
        batch = {"source_images": images, "source_mask": mask, "text": text}
        mean = CLIP4CIR(backbone, view_strategy="meanpool").eval()
        first = CLIP4CIR(backbone, view_strategy="meanpool_normalised").eval()
        multi = CLIP4CIR(backbone, view_strategy="maxsim").eval()
        q_mean, t_mean = mean.encode_query(batch), mean.encode_target(Products(images, mask))
        q_first, t_first = first.encode_query(batch), first.encode_target(Products(images, mask))
        q_multi, t_multi = multi.encode_query(batch), multi.encode_target(Products(images, mask))
    for b in range(2):
        unit_t = F.normalize(torch.stack(per_t[b]), dim=-1)
        assert torch.allclose(q_mean[b], F.normalize(torch.stack(per_q[b]).mean(0), dim=-1), atol=1e-5)
        assert torch.allclose(q_first[b], q_mean[b], atol=1e-6)  # fused queries are unit-norm already
        assert torch.allclose(t_mean[b], F.normalize(torch.stack(per_t[b]).mean(0), dim=-1), atol=1e-5)  # eq. 15
        assert torch.allclose(t_first[b], F.normalize(unit_t.mean(0), dim=-1), atol=1e-5)
        n = len(per_q[b])
        assert torch.allclose(q_multi[b, :n], torch.stack(per_q[b]), atol=1e-5) and q_multi[b, n:].isnan().all()
        assert torch.allclose(t_multi[b, :n], unit_t, atol=1e-5)
