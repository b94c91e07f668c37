from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from support.shard_tools import rewrite_shard

from datamodules import ShardDataModule, SyntheticDataModule
from datamodules.batching import collate, pad_views
from datamodules.shards import iterate_shards, read_manifest, shard_urls


def test_pad_views_builds_the_view_mask() -> None:
    stacks = [torch.ones(2, 3, 4, 4), torch.ones(5, 3, 4, 4), torch.ones(1, 3, 4, 4)]
    images, mask = pad_views(stacks)
    assert images.shape == (3, 5, 3, 4, 4)
    assert mask.sum(1).tolist() == [2, 5, 1]
    assert images[0, 2:].abs().sum() == 0 and images[2, 1:].abs().sum() == 0
    batch = collate([{"images": s, "product_id": str(i)} for i, s in enumerate(stacks)])
    assert batch["mask"].sum(1).tolist() == [2, 5, 1] and batch["product_id"] == ["0", "1", "2"]


def test_eval_loaders_cover_gallery_and_queries_once(small_data: Path) -> None:
    dm = ShardDataModule(str(small_data), eval_batch_size=16, num_workers=0)
    manifest = read_manifest(small_data)
    gallery, queries = dm.val_dataloader()
    ids, n_views = [], 0
    for batch in gallery:
        batch = dm.on_before_batch_transfer(batch, 0)
        ids += batch["product_id"]
        n_views += int(batch["mask"].sum())
        for meta, m in zip(batch["meta"], batch["mask"], strict=True):
            assert int(m.sum()) == len(meta["view_names"])
    assert len(ids) == len(set(ids)) == manifest["splits"]["val"]["products"]
    n_queries = sum(len(b["text"]) for b in queries)
    assert n_queries == manifest["splits"]["val"]["triplets"]
    assert dm.skipped_total == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_training_epoch_has_the_same_number_of_full_batches(small_data: Path, workers: int) -> None:
    dm = ShardDataModule(str(small_data), batch_size=8, num_workers=workers, shuffle_buffer=20)
    per_worker, n_workers = dm.train_batches_per_worker()
    batches = list(dm.train_dataloader())
    assert len(batches) == per_worker * n_workers
    assert all(len(b["text"]) == 8 for b in batches)
    b = batches[0]
    assert b["source_images"].shape[:2] == b["source_mask"].shape and b["target_images"].ndim == 5


class _FakeTrainer:
    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


def test_batches_per_rank_do_not_depend_on_shard_division(small_data: Path) -> None:
    # 2 ranks, shards that do not divide evenly: every rank must still run the same number of batches.
    dm = ShardDataModule(str(small_data), batch_size=4, num_workers=3)
    n = read_manifest(small_data)["splits"]["train"]["triplets"]
    counts = []
    for rank in (0, 1):
        dm.trainer = _FakeTrainer(rank, 2)  # type: ignore[assignment]
        per_worker, workers = dm.train_batches_per_worker()
        counts.append(per_worker * workers)
    assert counts[0] == counts[1] >= n // (4 * 2)


def test_corrupt_gallery_sample_is_skipped_counted_and_reported(small_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    manifest = read_manifest(data)
    shard = Path(shard_urls(data, manifest, "val", "gallery")[0])
    # Rewrite the first shard with one image's bytes flipped.
    with tarfile.open(shard) as tar:
        victim = next(m.name for m in tar.getmembers() if m.name.endswith("view0.jpg"))
    rewrite_shard(shard, lambda name, b: b[:30] + bytes(x ^ 0xFF for x in b[30:]) if name == victim else b)
    # One of ~30 gallery products is more than the default 1% budget; 5% lets it be skipped.
    dm = ShardDataModule(str(data), eval_batch_size=16, num_workers=0, max_skip_rate=0.05)
    gallery, _ = dm.val_dataloader()
    n = sum(len(dm.on_before_batch_transfer(b, 0)["product_id"]) for b in gallery)
    assert n == manifest["splits"]["val"]["products"] - 1
    assert dm.skipped_total == 1
    assert len(list(iterate_shards([str(shard)], handler=lambda e: True))) == n_in(shard) - 1


def n_in(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers()})


def test_synthetic_prepare_data_generates_once_and_checks_settings(tmp_path: Path) -> None:
    dm = SyntheticDataModule(str(tmp_path / "d"), products=40, num_workers=0)
    dm.prepare_data()
    assert read_manifest(tmp_path / "d")["source"]["products"] == 40
    dm.prepare_data()  # present: nothing to do
    with pytest.raises(ValueError, match="delete") as err:
        SyntheticDataModule(str(tmp_path / "d"), products=50).prepare_data()
    # The error names what differs, the keys that match the folder, and the module for a folder as it is.
    message = str(err.value)
    assert "products: folder 40, config 50" in message and "datamodules.ShardDataModule" in message
    assert "--data.init_args.products=40 --data.init_args.generator_seed=0" in message
    # ...and following it works: the folder trains as it is through ShardDataModule.
    assert ShardDataModule(str(tmp_path / "d"), num_workers=0).datasets


@pytest.mark.parametrize(("key", "value"), [("batch_size", 0), ("batch_size", -4), ("eval_batch_size", 0),
                                            ("num_workers", -1)])
def test_bad_loader_sizes_are_refused_naming_the_key(small_data: Path, key: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"data\.init_args: {key}={value}: must be"):
        ShardDataModule(str(small_data), **{key: value})


def test_eval_query_batches_carry_the_subset_and_view_incompleteness(small_data: Path) -> None:
    from datamodules.synthetic import generate

    data = generate(120, seed=3, val_fraction=0.25)  # what small_data holds
    expected = {(t.source_id, t.target_id): t for t in data.triplets["val"]}
    dm = ShardDataModule(str(small_data), eval_batch_size=8, num_workers=0)
    seen = 0
    for batch in dm.val_dataloader()[1]:
        for meta in batch["meta"]:
            t = meta["triplet"]
            truth = expected[(t["source_id"], t["target_id"])]
            assert t["subset_ids"] == truth.subset_ids and t["target_id"] in t["subset_ids"]
            assert t["view_incomplete"] is truth.view_incomplete
            seen += 1
    assert seen == len(expected) and any(t.view_incomplete for t in expected.values())


def test_first_view_queries_keep_only_the_sources_first_view(small_data: Path) -> None:
    whole = ShardDataModule(str(small_data), eval_batch_size=8, num_workers=0)
    first = ShardDataModule(str(small_data), eval_batch_size=8, num_workers=0, query_views="first")
    for a, b in zip(whole.val_dataloader()[1], first.val_dataloader()[1], strict=True):
        assert a["source_id"] == b["source_id"] and a["text"] == b["text"]
        assert b["source_mask"].shape[1] == 1 and bool(b["source_mask"].all())
        assert torch.equal(b["source_images"][:, 0], a["source_images"][:, 0])
        assert b["source_caption"] == [m["source"]["view_captions"][0] for m in b["meta"]]
        assert torch.equal(a["target_mask"], b["target_mask"])
    assert max(int(b["source_mask"].sum(1).max()) for b in whole.val_dataloader()[1]) > 1
    # The gallery is whole either way.
    for a, b in zip(whole.val_dataloader()[0], first.val_dataloader()[0], strict=True):
        assert torch.equal(a["mask"], b["mask"])
    with pytest.raises(ValueError, match="query_views='front'"):
        ShardDataModule(str(small_data), query_views="front")  # type: ignore[arg-type]


def test_a_folder_from_an_older_generator_is_refused(tmp_path: Path) -> None:
    import json

    from datamodules.synthetic import GENERATOR_VERSION

    SyntheticDataModule(str(tmp_path / "d"), products=40, num_workers=0).prepare_data()
    manifest = tmp_path / "d" / "manifest.json"
    old = json.loads(manifest.read_text())
    old["source"]["version"] = GENERATOR_VERSION - 1
    manifest.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="delete") as err:
        SyntheticDataModule(str(tmp_path / "d"), products=40, num_workers=0).prepare_data()
    message = str(err.value)
    assert f"generator version: folder {GENERATOR_VERSION - 1}, this code {GENERATOR_VERSION}" in message
    assert "--data.init_args.products" not in message  # the settings match: only regenerating helps


def test_synthetic_sessions_are_generated_recorded_and_a_folder_with_others_refused(tmp_path: Path) -> None:
    import json

    from datamodules.session_shards import session_lengths_of

    dm = SyntheticDataModule(str(tmp_path / "d"), products=40, sessions=5, session_turns=(2, 3), num_workers=0,
                             train_on="sessions", batch_size=1)
    dm.prepare_data()
    manifest = read_manifest(tmp_path / "d")
    assert manifest["source"]["sessions"] == {"count": 5, "min_turns": 2, "max_turns": 3}
    # val_fraction 0.2: val gets ceil(5 * 0.2) = 1 session, train the other 4, each of 2 or 3 turns.
    lengths = {split: session_lengths_of(manifest["splits"][split]) for split in ("train", "val")}
    assert sum(lengths["train"].values()) == 4 and sum(lengths["val"].values()) == 1
    assert set(lengths["train"]) | set(lengths["val"]) <= {2, 3}
    turns = [len(b["session_id"]) for b in dm.train_dataloader()]  # one row a turn, one session a batch
    assert len(turns) == 4 and sum(turns) == sum(k * v for k, v in lengths["train"].items())
    dm.prepare_data()  # same settings: nothing to do
    for kwargs, config in [({}, "none"), ({"sessions": 5, "session_turns": (2, 5)}, "5 of 2-5 turns"),
                           ({"sessions": 6, "session_turns": (2, 3)}, "6 of 2-3 turns")]:
        with pytest.raises(ValueError, match="delete") as err:
            SyntheticDataModule(str(tmp_path / "d"), products=40, num_workers=0, **kwargs).prepare_data()
        message = str(err.value)
        assert f"sessions: folder 5 of 2-3 turns, config {config}" in message and "\n" not in message
        assert "--data.init_args.sessions=5 --data.init_args.session_turns=[2,3]" in message
    # A single-turn folder asked for sessions: the flag that trains on it as it is says sessions=0.
    SyntheticDataModule(str(tmp_path / "e"), products=40, num_workers=0).prepare_data()
    with pytest.raises(ValueError, match="sessions: folder none, config 5 of 2-5 turns") as err:
        SyntheticDataModule(str(tmp_path / "e"), products=40, sessions=5, num_workers=0).prepare_data()
    assert "--data.init_args.sessions=0" in str(err.value)
    # Sessions chained from the triplets after generation (cir data sessions): the generator's own data,
    # trained as before with sessions=0, refused to a config that asks for generated sessions.
    manifest = tmp_path / "e" / "manifest.json"
    chained = json.loads(manifest.read_text())
    chained["source"]["sessions"] = {"chained": True, "min_turns": 2, "max_turns": 5, "seed": 0}
    manifest.write_text(json.dumps(chained))
    SyntheticDataModule(str(tmp_path / "e"), products=40, num_workers=0).prepare_data()
    with pytest.raises(ValueError, match="sessions: folder chained from its triplets, config 5 of 2-5 turns"):
        SyntheticDataModule(str(tmp_path / "e"), products=40, sessions=5, num_workers=0).prepare_data()
    with pytest.raises(ValueError, match="sessions=-1"):
        SyntheticDataModule(str(tmp_path / "f"), sessions=-1)


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_synthetic_defaults_write_what_the_generator_writes_without_sessions(tmp_path: Path) -> None:
    from datamodules.synthetic import write_synthetic

    SyntheticDataModule(str(tmp_path / "dm"), products=40, num_workers=0).prepare_data()
    write_synthetic(tmp_path / "direct", products=40, seed=0)
    files = sorted(p.name for p in (tmp_path / "direct").glob("*.tar"))
    assert files and files == sorted(p.name for p in (tmp_path / "dm").glob("*.tar"))
    for name in files:  # member by member (a tar header carries its write time)
        assert members(tmp_path / "dm" / name) == members(tmp_path / "direct" / name)
    assert "sessions" not in read_manifest(tmp_path / "dm")["source"]


def test_shards_written_before_the_group_fields_still_read(small_data: Path, tmp_path: Path) -> None:
    import json

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    manifest = read_manifest(data)

    def strip(name: str, payload: bytes) -> bytes:
        if not name.endswith(".json"):
            return payload
        meta = json.loads(payload)
        for key in ("subset_ids", "view_incomplete"):
            meta["triplet"].pop(key)
        return json.dumps(meta).encode()

    for shard in shard_urls(data, manifest, "val", "triplets"):
        rewrite_shard(Path(shard), strip)
    dm = ShardDataModule(str(data), eval_batch_size=16, num_workers=0, query_views="first")
    metas = [m["triplet"] for b in dm.val_dataloader()[1] for m in b["meta"]]
    assert len(metas) == manifest["splits"]["val"]["triplets"] and dm.skipped_total == 0
    assert all(t.get("subset_ids", []) == [] and t.get("view_incomplete", False) is False for t in metas)


def _cut_first_source_views(data: Path, count: int) -> list[str]:
    """Truncate the first source view of ``count`` training samples; their keys."""
    victims: list[str] = []
    for shard in shard_urls(data, read_manifest(data), "train", "triplets"):
        with tarfile.open(shard) as tar:
            names = [m.name for m in tar.getmembers() if m.name.endswith("src0.jpg")][: count - len(victims)]
        rewrite_shard(Path(shard), lambda name, b, cut=set(names): b[:40] if name in cut else b)
        victims += [n.removesuffix(".src0.jpg") for n in names]
        if len(victims) == count:
            return victims
    raise AssertionError("not enough samples")


def test_the_training_stream_skips_corrupt_samples_within_its_budget_and_stops_past_it(small_data: Path,
                                                                                       tmp_path: Path) -> None:
    from datamodules.shards import TooManyCorruptSamples

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    victims = _cut_first_source_views(data, 2)
    n = read_manifest(data)["splits"]["train"]["triplets"]
    # 2 of ~148 samples (1.4%): a 5% budget skips and counts both and still runs every step.
    dm = ShardDataModule(str(data), batch_size=4, num_workers=0, image_size=16, max_skip_rate=0.05)
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert len(batches) == n // 4 and dm.skipped_total == 2
    # The default 1% allows one: the second stops the epoch, naming the first errors and the key to raise.
    dm = ShardDataModule(str(data), batch_size=4, num_workers=0, image_size=16)
    with pytest.raises(TooManyCorruptSamples, match="max_skip_rate") as err:
        list(dm.train_dataloader())
    assert any(v.split("/")[-1] in str(err.value) for v in victims)


def test_a_bug_in_the_transform_stops_at_the_first_sample_naming_it(small_data: Path) -> None:
    from datamodules.shards import StageError

    calls = []

    def broken(img: object) -> torch.Tensor:
        calls.append(1)
        raise ZeroDivisionError("a planted bug")

    dm = ShardDataModule(str(small_data), batch_size=4, num_workers=0, image_size=16)
    dm.set_image_transform(broken)
    with pytest.raises(StageError, match=r"--.*ZeroDivisionError: a planted bug"):
        next(iter(dm.train_dataloader()))
    assert len(calls) == 1 and dm.skipped_total == 0
    with pytest.raises(StageError, match="ZeroDivisionError"):
        next(iter(dm.val_dataloader()[0]))
