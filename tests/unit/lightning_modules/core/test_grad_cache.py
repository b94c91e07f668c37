"""GradCache: one step in chunks of 4 equals one step on the whole batch of 16, for every family.

The reference is the plain step itself (the loss of the whole batch, back-propagated at once): the
cached step must log the same loss terms and leave the same parameters after an SGD step, within
1e-5 in float32. The 2-process version is in ``tests/integration/test_grad_cache_ddp.py``.
"""

from __future__ import annotations

import pytest
import torch
from support.grad_cache import CASES, batch, build, max_difference, moved, step
from torch import nn

from lightning_modules.core.grad_cache import RandomState, split_batch

TOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_cached_step_equals_the_plain_step(case: str) -> None:
    data = batch(build(case, None), 16, seed=7)
    before = dict(build(case, None).named_parameters())
    plain, cached = step(case, None, data), step(case, 4, data)
    assert plain["logged"].keys() == cached["logged"].keys() and "train/loss" in plain["logged"]
    for name, value in plain["logged"].items():
        assert cached["logged"][name] == pytest.approx(value, abs=TOL), name
    assert max_difference(plain["params"], cached["params"]) < TOL
    assert moved(before, plain["params"]) > 0  # the step trained something (the comparison is not vacuous)


def test_split_batch_keeps_every_field_per_sample() -> None:
    data = {"text": list("abcdefg"), "source_images": torch.arange(7 * 2).view(7, 2), "meta": [{}] * 7}
    parts = split_batch(data, 3)
    assert [len(p["text"]) for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([p["source_images"] for p in parts]), data["source_images"])
    with pytest.raises(ValueError, match="'scale' is not per-sample"):
        split_batch({**data, "scale": [1.0]}, 3)


def test_pass_two_replays_the_dropout_masks_of_pass_one() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    x = torch.randn(4, 8)
    state = RandomState.capture()
    first = net(x)
    state.restore()
    assert torch.equal(net(x), first)
    assert not torch.equal(net(x), first)  # without the restore the masks differ


def test_fp16_and_bad_chunk_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="grad_cache_chunk=0"):
        build("clip4cir", 0)
