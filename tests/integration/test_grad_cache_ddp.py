"""GradCache under DDP (2 gloo processes): each rank holds 8 triplets of a global batch of 16 and
embeds them in chunks of 4; negatives are gathered across ranks as in the plain step. One step must
log the same loss terms and leave the same parameters as the plain DDP step, on both ranks."""

from __future__ import annotations

import os

import pytest
from lightning.pytorch.strategies import DDPStrategy
from support.gloo import run_gloo
from support.grad_cache import CASES, batch, build, max_difference, step

TOL = 1e-5


def both_steps(rank: int, world: int) -> dict[str, tuple[dict, dict, float]]:
    # Lightning joins the process group that run_gloo opened instead of launching its own processes.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0")
    out = {}
    for case in CASES:
        data = batch(build(case, None), 8, seed=100 + rank)
        strategy = DDPStrategy(process_group_backend="gloo")
        plain = step(case, None, data, strategy=strategy, devices=world)
        cached = step(case, 4, data, strategy=DDPStrategy(process_group_backend="gloo"), devices=world)
        out[case] = (plain["logged"], cached["logged"], max_difference(plain["params"], cached["params"]),
                     {k: v for k, v in plain["params"].items() if k.endswith("weight")})
    return out


@pytest.mark.slow
def test_cached_ddp_step_equals_the_plain_ddp_step() -> None:
    ranks = run_gloo(both_steps, 2)
    for case in CASES:
        for rank in ranks:
            plain, cached, difference, _ = rank[case]
            for name, value in plain.items():
                assert cached[name] == pytest.approx(value, abs=TOL), (case, name)
            assert difference < TOL, case
        # DDP kept the replicas equal: both ranks hold the same weights after the step.
        assert max_difference(ranks[0][case][3], ranks[1][case][3]) < TOL, case
