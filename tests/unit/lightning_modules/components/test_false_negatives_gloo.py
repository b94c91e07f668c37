"""On 2 gloo processes, the gathered losses with false-negative masking equal one process over the
concatenated batch (loss and input gradients), with duplicates planted within and across ranks; and
SPRC's negatives are gathered like InfoNCE's (without the gather a rank's loss would differ)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.false_negatives import keys_of, sprc_contrast_by_hand, symmetric_by_hand
from support.gloo import run_gloo

from lightning_modules.components import SymmetricInfoNCE
from lightning_modules.families.sprc import SPRCLoss

# Rows 0-3 on rank 0, 4-7 on rank 1: "a" within rank 0 and across, "b" across ranks.
NAMES = ["a", "b", "c", "a", "d", "b", "a", "e"]
TAU = 0.1


def _infonce_rank(rank: int, world: int, q: torch.Tensor, d: torch.Tensor, names: list[str] | None) -> tuple:
    b = q.shape[0] // world
    part = slice(rank * b, (rank + 1) * b)
    ql, dl = q[part].clone().requires_grad_(True), d[part].clone().requires_grad_(True)
    fn = SymmetricInfoNCE(temperature=TAU, learnable_temperature=False)
    fn.set_distributed(rank, world)
    loss = fn(ql, dl, ids=keys_of(names[part]) if names else None)
    loss.backward()
    masked = fn.pop_masked_negatives()
    return loss.detach(), ql.grad, dl.grad, None if masked is None else int(masked[0])


@pytest.mark.slow
@pytest.mark.parametrize("names", [NAMES, [f"p{i}" for i in range(8)]], ids=["duplicates", "distinct"])
def test_gathered_masked_infonce_equals_one_process(names: list[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    q, d = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    ref_q, ref_d = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
    ref = SymmetricInfoNCE(temperature=TAU, learnable_temperature=False)(ref_q, ref_d, ids=keys_of(names))
    ref.backward()
    assert float(ref.detach()) == pytest.approx(symmetric_by_hand(q, d, names, TAU), rel=1e-5)

    out = run_gloo(_infonce_rank, 2, q, d, names)
    assert torch.stack([o[0] for o in out]).mean().item() == pytest.approx(ref.item(), rel=1e-5)
    # DDP averages gradients over ranks: the gathered gradient / world size is the one-process one.
    assert torch.allclose(torch.cat([o[1] for o in out]) / 2, ref_q.grad, atol=1e-6)
    assert torch.allclose(torch.cat([o[2] for o in out]) / 2, ref_d.grad, atol=1e-6)
    # Duplicates: rank 0's rows 0 and 3 each meet 2 copies of "a" (one on rank 1), row 1 one "b"
    # on rank 1; both directions count.
    expected = 2 * (2 + 1 + 2) if names is NAMES else 0
    assert out[0][3] == expected


def _sprc_rank(rank: int, world: int, inputs: dict[str, torch.Tensor], names: list[str] | None) -> tuple:
    b = inputs["query"].shape[0] // world
    local = {k: v[rank * b : (rank + 1) * b].clone().requires_grad_(True) for k, v in inputs.items()
             if k != "prompt_tokens"}
    fn = SPRCLoss(temperature=TAU, rtc_weight=0.4, align_weight=0.4)
    fn.set_distributed(rank, world)
    ids = keys_of(names[rank * b : (rank + 1) * b]) if names else None
    out = fn(local["query"], local["targets"], relative=local["relative"], prompt=local["prompt"],
             prompt_tokens=inputs["prompt_tokens"], ids=ids)
    out["loss"].backward()
    # Without the gather each rank would see only its own targets.
    alone = fn(local["query"], local["targets"], relative=local["relative"], prompt=local["prompt"],
               prompt_tokens=inputs["prompt_tokens"], ids=ids, gather=False)["itc"]
    return ({k: v.detach() for k, v in out.items()}, {k: v.grad.nan_to_num(0.0) for k, v in local.items()},
            fn.temp.grad.clone(), alone.detach())


def _sprc_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    targets = F.normalize(torch.randn(8, 3, 6, generator=gen), dim=-1)
    targets[2, 2] = torch.nan  # padding tokens, on both ranks
    targets[5, 1:] = torch.nan
    return {"query": F.normalize(torch.randn(8, 6, generator=gen), dim=-1),
            "relative": F.normalize(torch.randn(8, 6, generator=gen), dim=-1), "targets": targets,
            "prompt": torch.randn(8, 4, 7, generator=gen), "prompt_tokens": torch.randn(4, 7, generator=gen)}


@pytest.mark.slow
@pytest.mark.parametrize("names", [NAMES, None], ids=["masked", "unmasked"])
def test_sprc_gathers_its_negatives_across_ranks(names: list[str] | None) -> None:
    inputs = _sprc_inputs()
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k != "prompt_tokens"}
    fn = SPRCLoss(temperature=TAU, rtc_weight=0.4, align_weight=0.4)
    ref = fn(leaves["query"], leaves["targets"], relative=leaves["relative"], prompt=leaves["prompt"],
             prompt_tokens=inputs["prompt_tokens"], ids=keys_of(names) if names else None)
    ref["loss"].backward()
    itc = sprc_contrast_by_hand(inputs["query"], inputs["targets"], names, TAU)
    assert float(ref["itc"]) == pytest.approx(itc, rel=1e-5)

    out = run_gloo(_sprc_rank, 2, inputs, names)
    for term in ("itc", "rtc", "align", "loss"):
        assert torch.stack([o[0][term] for o in out]).mean().item() == pytest.approx(ref[term].item(), rel=1e-5), term
    for name, leaf in leaves.items():
        grad = torch.cat([o[1][name] for o in out]) / 2
        assert torch.allclose(grad, leaf.grad.nan_to_num(0.0), atol=1e-6), name
    assert torch.stack([o[2] for o in out]).mean().item() == pytest.approx(fn.temp.grad.item(), rel=1e-5)
    # Without the gather each rank would see only its own 4 targets: another loss.
    assert torch.stack([o[3] for o in out]).mean().item() != pytest.approx(ref["itc"].item(), rel=1e-3)
