from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.gloo import run_gloo

from lightning_modules.components import SymmetricInfoNCE


def test_matches_hand_computed_value() -> None:
    # Two orthogonal pairs: q0·d0 = 1, q0·d1 = 0, q1·d0 = 0.6, q1·d1 = 0.8 (all unit vectors).
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    loss = SymmetricInfoNCE(temperature=tau, learnable_temperature=False)(q, d)
    s = [[1.0, 0.0], [0.6, 0.8]]  # s[i][j] = q_i · d_j

    def ce(row: list[float], label: int) -> float:
        return -row[label] / tau + math.log(sum(math.exp(x / tau) for x in row))

    q2d = (ce(s[0], 0) + ce(s[1], 1)) / 2
    d2q = (ce([s[0][0], s[1][0]], 0) + ce([s[0][1], s[1][1]], 1)) / 2
    assert loss.item() == pytest.approx((q2d + d2q) / 2, rel=1e-6)


def test_normalises_inputs_and_learns_temperature() -> None:
    q, d = torch.randn(6, 4), torch.randn(6, 4)
    loss_fn = SymmetricInfoNCE(temperature=0.07)
    a = loss_fn(q, d)
    b = loss_fn(q * 3.0, d * 0.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    a.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.temperature == pytest.approx(0.07)
    fixed = SymmetricInfoNCE(temperature=0.07, learnable_temperature=False)
    assert not fixed.logit_scale.requires_grad
    with pytest.raises(ValueError):
        SymmetricInfoNCE(temperature=0)


def _rank_loss(rank: int, world: int, q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b = q.shape[0] // world
    ql = q[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    dl = d[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    fn = SymmetricInfoNCE(temperature=0.1, learnable_temperature=False)
    fn.set_distributed(rank, world)
    loss = fn(ql, dl)
    loss.backward()
    return loss.detach(), ql.grad.detach(), dl.grad.detach()


@pytest.mark.slow
def test_two_process_gloo_equals_one_process_on_the_global_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    q, d = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    ref_q, ref_d = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
    ref = SymmetricInfoNCE(temperature=0.1, learnable_temperature=False)(ref_q, ref_d)
    ref.backward()

    out = run_gloo(_rank_loss, 2, q, d)
    losses = [out[r][0] for r in range(2)]
    # Mean of the per-rank losses is the global loss; DDP averages gradients over ranks, so the
    # all-gather-with-grad gradient / world_size must equal the one-process gradient.
    assert torch.stack(losses).mean().item() == pytest.approx(ref.item(), rel=1e-5)
    grad_q = torch.cat([out[r][1] for r in range(2)]) / 2
    grad_d = torch.cat([out[r][2] for r in range(2)]) / 2
    assert torch.allclose(grad_q, ref_q.grad, atol=1e-6) and torch.allclose(grad_d, ref_d.grad, atol=1e-6)
    # And without the gather, negatives from the other rank would be missing: a different loss.
    local = SymmetricInfoNCE(temperature=0.1, learnable_temperature=False)
    assert local(q[:4], d[:4]).item() != pytest.approx(losses[0].item(), rel=1e-3)
    assert F.normalize(q, dim=-1).shape == q.shape
