from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.fusion import Combiner, SumFusion


def test_sum_fusion_reference() -> None:
    img, txt = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    expected = torch.tensor([[1.0, 1.0]]) / 2**0.5
    assert torch.allclose(SumFusion()(img, txt), expected)


def test_combiner_widths_follow_clip4cir() -> None:
    c = Combiner(dim=16)
    assert c.text_projection.out_features == 64 and c.combiner.out_features == 128
    assert c.output.out_features == 16
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in c.modules())


def test_combiner_residual_mix_by_hand() -> None:
    torch.manual_seed(0)
    c = Combiner(dim=8).eval()
    nn.init.zeros_(c.output.weight)
    nn.init.zeros_(c.output.bias)
    last = c.mixing[3]
    nn.init.zeros_(last.weight)
    nn.init.constant_(last.bias, 0.4)  # λ = sigmoid(0.4) whatever the inputs
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    lam = 1 / (1 + torch.exp(torch.tensor(-0.4)))
    expected = F.normalize(lam * txt + (1 - lam) * img, dim=-1)
    assert torch.allclose(c(img, txt), expected, atol=1e-6)
    w = c.mixing_weight(img, txt)
    assert torch.allclose(w, lam.expand(5, 1))


def test_combiner_output_is_unit_norm_and_learns() -> None:
    c = Combiner(dim=8)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    out = c(img, txt)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)
    out.sum().backward()
    assert c.combiner.weight.grad is not None and c.mixing[0].weight.grad is not None
