"""Cost-aware batching (``data.init_args.bucket_batches``): less padding, the same samples, the same
number of batches on every rank and worker, reproducible from the seed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from callbacks.data_health import SkippedSamplesLogger
from datamodules import ShardDataModule
from datamodules.bucketing import grid_order
from datamodules.synthetic import DatasetStyle, write_synthetic

# Two sub-datasets with 1-5 views at two resolutions: view counts and patch counts both vary.
STYLES = {"small": DatasetStyle(size=48, min_views=1, max_views=5),
          "large": DatasetStyle(size=64, min_views=1, max_views=5)}


@pytest.fixture(scope="module")
def one_to_five(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-to-five")
    write_synthetic(out, 120, seed=5, val_fraction=0.25, maxcount=40, styles=STYLES)
    return out


@dataclass
class FakePatched:
    """Stands in for Qwen's ``PatchedImage``: only the patch rows matter to batching."""

    pixel_values: torch.Tensor


def rows_of(size: int) -> int:
    return (size // 8) ** 2


class FakePatches:
    """A Qwen-like transform: a view of side s becomes (s/8)² patch rows (36 or 64 here)."""

    def __call__(self, img: Image.Image) -> FakePatched:
        return FakePatched(torch.zeros(rows_of(img.size[0]), 2))


def loader(data: Path, **kwargs: Any) -> ShardDataModule:
    """Small images and a small shuffle buffer: batching is under test, not decoding."""
    return ShardDataModule(str(data), image_size=16, shuffle_buffer=16, **kwargs)


def epoch(dm: ShardDataModule) -> list[dict[str, Any]]:
    return [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]


def brute_padding(batches: list[dict[str, Any]], patches: bool) -> float:
    """Padding from the products' metadata alone: per field, B × the largest cost − the costs."""
    padded = total = 0
    for b in batches:
        for side in ("source", "target"):
            costs = [len(m[side]["view_names"]) * (rows_of(STYLES[m[side]["dataset"]].size) if patches else 1)
                     for m in b["meta"]]
            total += max(costs) * len(costs)
            padded += max(costs) * len(costs) - sum(costs)
    return padded / total


def ids(batches: list[dict[str, Any]]) -> list[list[tuple[str, str, str]]]:
    return [list(zip(b["source_id"], b["target_id"], b["text"], strict=True)) for b in batches]


def test_grid_order_makes_uniform_batches_where_sorting_by_the_sum_cannot() -> None:
    # (1, 5) and (5, 1) cost the same in total but pad each other's source and target.
    costs = [(1, 5), (5, 1), (1, 5), (5, 1), (5, 5), (1, 1), (5, 5), (1, 1)]

    def padding(order: list[int]) -> int:
        batches = [[costs[i] for i in order[s:s + 2]] for s in range(0, len(order), 2)]
        return sum(2 * max(c[f] for c in b) - sum(c[f] for c in b) for b in batches for f in (0, 1))

    assert sorted(grid_order(costs, 2)) == list(range(8))
    assert padding(grid_order(costs, 2)) == 0
    assert padding(sorted(range(8), key=lambda i: sum(costs[i]))) == 16


@pytest.mark.parametrize("patches", [False, True], ids=["tensor-views", "qwen-patches"])
def test_bucketing_pads_less_with_the_same_samples_and_batch_count(one_to_five: Path, patches: bool) -> None:
    runs = {}
    for bucket in (0, 7):
        dm = loader(one_to_five, batch_size=8, num_workers=0, bucket_batches=bucket)
        if patches:
            dm.set_image_transform(FakePatches())
        runs[bucket] = (epoch(dm), dm.padding_fraction())
    per_worker, _ = dm.train_batches_per_worker()
    assert per_worker % 7 != 0  # the last buffer of the epoch is a partial one
    for batches, fraction in runs.values():
        assert len(batches) == per_worker and all(len(b["text"]) == 8 for b in batches)
        assert fraction == pytest.approx(brute_padding(batches, patches), abs=1e-12)
    plain, bucketed = runs[0][1], runs[7][1]
    assert bucketed < 0.75 * plain, (plain, bucketed)
    assert Counter(x for b in ids(runs[0][0]) for x in b) == Counter(x for b in ids(runs[7][0]) for x in b)
    if patches:  # the same seed, the same batches in the same order
        again = loader(one_to_five, batch_size=8, num_workers=0, bucket_batches=7)
        again.set_image_transform(FakePatches())
        assert ids(epoch(again)) == ids(runs[7][0])


class _FakeTrainer:
    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


def test_every_rank_and_worker_yields_the_same_number_of_batches(one_to_five: Path) -> None:
    dm = loader(one_to_five, batch_size=4, num_workers=2, bucket_batches=4)
    per_rank = []
    for rank in (0, 1):
        dm.trainer = _FakeTrainer(rank, 2)  # type: ignore[assignment]
        per_worker, workers = dm.train_batches_per_worker()
        steps = dm.train_batches_per_rank()
        assert per_worker % 4 != 0 and workers == 2  # a last bucket of fewer batches than the others
        batches = list(dm.train_dataloader())
        # Every batch says which worker made it (the skipped-sample tag); the rank's batches are dealt
        # to its workers in turn, so worker 0 runs the odd one out.
        assert Counter(b["_skipped"][1] for b in batches) == {0: (steps + 1) // 2, 1: steps // 2}
        assert per_worker == (steps + 1) // 2
        assert all(len(b["text"]) == 4 for b in batches)
        per_rank.append(len(batches))
    assert per_rank[0] == per_rank[1]


def test_negative_switches_are_refused_together_naming_the_keys(one_to_five: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.init_args: bucket_batches=-1: must be >= 0 \(0 = off\); "
                                         r"hard_negatives=-2: must be >= 0"):
        ShardDataModule(str(one_to_five), bucket_batches=-1, hard_negatives=-2)


def test_the_callback_logs_the_epoch_padding_and_resets_it(one_to_five: Path) -> None:
    dm = ShardDataModule(str(one_to_five), num_workers=0)
    dm.on_before_batch_transfer({"_padding": (3, 12)}, 0)
    dm.on_before_batch_transfer({"_padding": (1, 4)}, 0)
    logged: dict[str, float] = {}

    class Module:
        def log(self, name: str, value: float, **kwargs: Any) -> None:
            logged[name] = value

    class Trainer:
        datamodule = dm

    SkippedSamplesLogger().on_train_epoch_end(Trainer(), Module())  # type: ignore[arg-type]
    assert logged == {"data/skipped_samples": 0.0, "data/padding_fraction": 0.25}
    assert dm.padding_fraction() is None
