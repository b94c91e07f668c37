"""Mined negatives in training batches (``data.init_args.hard_negatives``): read by id through the
gallery's byte-offset index, exactly the mined products' views, missing slots masked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from datamodules import ShardDataModule
from datamodules.atomic import TEMP_MARK
from datamodules.batching import collate, pad_views
from datamodules.bucketing import padding_counts
from datamodules.negatives import GalleryReader, negatives_path, offsets_path, write_negatives
from datamodules.shards import read_manifest, shard_urls

K_MINED = 3


def members(shard: str) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def train_gallery(data: Path) -> dict[tuple[str, str], dict[str, bytes]]:
    """{(dataset, product id): {member extension: bytes}} of the train gallery, read the plain way:
    whole tars."""
    out = {}
    for shard in shard_urls(data, read_manifest(data), "train", "gallery"):
        files = members(shard)
        for name, payload in files.items():
            if name.endswith(".json"):
                meta, key = json.loads(payload), name[: -len(".json")]
                out[(meta["dataset"], meta["product_id"])] = {m[len(key) + 1:]: b for m, b in files.items()
                                                              if m.startswith(f"{key}.")}
    return out


def planned(source: str, target: str, candidates: list[str]) -> list[str]:
    """The test's "mined" negatives of a pair: 0 to 3 of its dataset's other products, by hash."""
    digest = lambda pid: hashlib.sha1(f"{source}/{target}/{pid}".encode()).hexdigest()  # noqa: E731
    ranked = sorted((p for p in candidates if p != target), key=digest)
    return ranked[: int(digest("n"), 16) % (K_MINED + 1)]


@pytest.fixture(scope="module")
def mined(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("negatives") / "data"
    shutil.copytree(small_data, data)  # the shared folder stays read-only: sidecars go into a copy
    by_dataset = defaultdict(list)
    for dataset, pid in train_gallery(data):
        by_dataset[dataset].append(pid)
    records = {}
    for shard in shard_urls(data, read_manifest(data), "train", "triplets"):
        for name, payload in members(shard).items():
            if name.endswith(".json"):
                t = json.loads(payload)["triplet"]
                ids = planned(t["source_id"], t["target_id"], sorted(by_dataset[t["dataset"]]))
                records[name[: -len(".json")]] = {"dataset": t["dataset"], "target_id": t["target_id"], "ids": ids,
                                                  "scores": [0.0] * len(ids), "positive": 1.0}
    write_negatives(data, "train", records, {"k": K_MINED, "margin": 0.95})
    return data


def test_batches_carry_exactly_the_mined_products_views(mined: Path) -> None:
    dm = ShardDataModule(str(mined), batch_size=4, num_workers=0, hard_negatives=2, shuffle_buffer=16, image_size=16)
    # The products as the gallery loader gives them to the target encoder.
    gallery = {}
    for batch in dm.eval_dataloaders("train")[0]:
        for i, (dataset, pid) in enumerate(zip(batch["dataset"], batch["product_id"], strict=True)):
            gallery[(dataset, pid)] = batch["images"][i][batch["mask"][i]]
    by_dataset = defaultdict(list)
    for dataset, pid in gallery:
        by_dataset[dataset].append(pid)
    seen = {"full": 0, "missing": 0}
    for _, batch in zip(range(4), dm.train_dataloader(), strict=False):
        images, mask = batch["negative_images"], batch["negative_mask"]
        assert images.shape[:3] == mask.shape and images.shape[1] == 2 and images.shape[3:] == (3, 16, 16)
        for b, (source, target, dataset) in enumerate(zip(batch["source_id"], batch["target_id"], batch["dataset"],
                                                          strict=True)):
            expected = planned(source, target, sorted(by_dataset[dataset]))[:2]
            assert batch["negative_ids"][b] == expected + [""] * (2 - len(expected))
            for j in range(2):
                if j < len(expected):
                    views = gallery[(dataset, expected[j])]
                    assert mask[b, j].tolist() == [i < len(views) for i in range(mask.shape[2])]
                    assert torch.equal(images[b, j, : len(views)], views)
                    seen["full"] += 1
                else:
                    assert not mask[b, j].any() and images[b, j].abs().sum() == 0
                    seen["missing"] += 1
                assert images[b, j][~mask[b, j]].abs().sum() == 0
    assert seen["full"] > 0 and seen["missing"] > 0  # both kinds of slot were checked


def test_the_offset_index_reads_every_product_and_is_rebuilt_when_a_shard_changes(mined: Path) -> None:
    expected = train_gallery(mined)
    reader = GalleryReader(mined, "train")
    read = {(d, p): reader.raw_sample(d, p) for d, ps in reader.products.items() for p in ps}
    assert {k: {m: b for m, b in v.items() if not m.startswith("__")} for k, v in read.items()} == expected
    cache = offsets_path(mined, "train")
    stamp = cache.stat().st_mtime_ns
    GalleryReader(mined, "train")
    assert cache.stat().st_mtime_ns == stamp  # reused, not rescanned
    shard = Path(shard_urls(mined, read_manifest(mined), "train", "gallery")[0])
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    GalleryReader(mined, "train")
    assert cache.stat().st_mtime_ns != stamp
    assert not [p for p in mined.iterdir() if TEMP_MARK in p.name]  # atomic writes leave no temp files behind
    with pytest.raises(KeyError, match="not in the train gallery"):
        reader.raw_sample("synth_studio", "no-such-product")


def test_a_missing_sidecar_names_the_file_and_the_command(small_data: Path) -> None:
    dm = ShardDataModule(str(small_data), num_workers=0, hard_negatives=2)
    with pytest.raises(FileNotFoundError, match=r"negatives-train\.json not found.*cir mine-negatives --config EXP "
                                                r"--ckpt CKPT --split train"):
        dm.train_dataloader()
    assert not offsets_path(small_data, "train").exists()  # failed before touching the folder


def test_a_sidecar_with_too_few_or_stale_negatives_is_refused_with_every_reason(mined: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(mined, data)
    path = negatives_path(data, "train")
    body = json.loads(path.read_text())
    body["triplet_shards"] = body["triplet_shards"][:-1]
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match=r"mined k=3 per triplet, fewer than data\.init_args\.hard_negatives=5.*"
                                         r"other triplet shards.*cir mine-negatives"):
        ShardDataModule(str(data), num_workers=0, hard_negatives=5).train_dataloader()


@dataclass
class Patched:
    pixel_values: torch.Tensor


def test_nested_negatives_collate_to_a_k_by_v_mask_for_tensors_and_patch_lists() -> None:
    view = torch.ones(3, 2, 2)
    examples = [{"negative_images": [torch.stack([view] * 2), view.new_zeros((0, 3, 2, 2))], "negative_ids": ["a", ""]},
                {"negative_images": [torch.stack([view] * 3), torch.stack([view])], "negative_ids": ["b", "c"]}]
    batch = collate(examples)
    assert batch["negative_images"].shape == (2, 2, 3, 3, 2, 2)
    assert batch["negative_mask"].tolist() == [[[True, True, False], [False, False, False]],
                                               [[True, True, True], [True, False, False]]]
    assert batch["negative_images"][~batch["negative_mask"]].abs().sum() == 0
    assert batch["negative_ids"] == [["a", ""], ["b", "c"]]
    # 12 view slots, 6 real: the missing slot's 3 are padding too (they are stacked and encoded).
    assert padding_counts(batch) == (6, 12)

    p = [Patched(torch.zeros(n, 1)) for n in (4, 6, 2)]
    lists, mask = pad_views([[[p[0], p[1]], []], [[p[2]], [p[0]]]])
    assert lists == [[[p[0], p[1]], []], [[p[2]], [p[0]]]]
    assert mask.tolist() == [[[True, True], [False, False]], [[True, False], [True, False]]]
    # Three requests of 10, 2 and 4 patches padded to 10; the missing one is not encoded at all.
    assert padding_counts({"negative_images": lists, "negative_mask": mask}) == (14, 30)
    # A one-level list is still one product per sample (source views), not negatives.
    flat, flat_mask = pad_views([[p[0]], [p[1], p[2]]])
    assert flat == [[p[0]], [p[1], p[2]]] and flat_mask.tolist() == [[True, False], [True, True]]
