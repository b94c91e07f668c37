"""Sessions as turn rows: flattening against a hand-built batch; the data module's session training
loader (every session once an epoch, resumed exactly) and its session evaluation loader; sessions
chained from a generated folder's triplets, read back whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules import ShardDataModule
from datamodules.chained_sessions import add_chained_sessions
from datamodules.schema import Triplet
from datamodules.session_batches import flatten_sessions, is_session_batch
from datamodules.sessions import sample_sessions
from datamodules.shards import iterate_shards, read_manifest, shard_urls


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("sessions")
    write_synthetic(out, products=200, seed=0, val_fraction=0.2, maxcount=40)
    add_chained_sessions(out, ("train", "val"), seed=0)
    return out


def _dm(folder: Path, **kwargs: object) -> ShardDataModule:
    return ShardDataModule(str(folder), batch_size=4, eval_batch_size=5, num_workers=0, **kwargs)


def test_flatten_gives_one_triplet_row_per_turn() -> None:
    views = {p: torch.full((n, 3, 2, 2), float(i)) for i, (p, n) in enumerate((("a", 1), ("b", 2), ("c", 3), ("d", 1)))}
    chains = [["a", "b", "c"], ["d", "a"]]
    turns = [[{"source_id": x, "target_id": y, "dataset": "g", "modification_short": f"{x}>{y}"}
              for x, y in zip(c, c[1:], strict=False)] for c in chains]
    batch = flatten_sessions({"session_id": ["s0", "s1"], "products": [[views[p] for p in c] for c in chains],
                              "texts": [[t["modification_short"] for t in ts] for ts in turns], "turns": turns,
                              "chain_meta": [[{"product_id": p, "dataset": "g", "short_caption": p.upper()} for p in c]
                                             for c in chains], "__key__": ["k0", "k1"]})
    assert is_session_batch(batch)
    assert batch["text"] == ["a>b", "b>c", "d>a"] and batch["source_id"] == ["a", "b", "d"]
    assert batch["target_id"] == ["b", "c", "a"] and batch["turn_index"] == [0, 1, 0]
    assert batch["session_index"] == [0, 0, 1] and batch["session_turns"] == [2, 2, 1]
    assert batch["__key__"] == ["k0/t0", "k0/t1", "k1/t0"] and batch["target_caption"] == ["B", "C", "A"]
    assert batch["meta"][1] == {"triplet": turns[0][1], "source": {"product_id": "b", "dataset": "g",
                                                                   "short_caption": "B"},
                                "target": {"product_id": "c", "dataset": "g", "short_caption": "C"}}
    # Views padded to the field's most views (sources a, b, d: 2), masks saying which are real.
    assert batch["source_images"].shape == (3, 2, 3, 2, 2)
    assert batch["source_mask"].tolist() == [[True, False], [True, True], [True, False]]
    assert batch["target_mask"].sum(1).tolist() == [2, 3, 1]
    assert torch.equal(batch["target_images"][1, :3], views["c"])


def test_chained_sessions_are_written_whole_and_counted(folder: Path) -> None:
    manifest = read_manifest(folder)
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        triplets = [Triplet(**s["json"]["triplet"]) for s in iterate_shards(shard_urls(folder, manifest, split,
                                                                                       "triplets"))]
        expected = sample_sessions(triplets, 2, 5, 0)
        read = list(iterate_shards(shard_urls(folder, manifest, split, "sessions")))
        assert entry["sessions"] == len(read) == len(expected) > 5
        assert sum(int(k) * v for k, v in entry["session_lengths"].items()) == sum(len(s) for s in expected)
        gallery = {s["json"]["product_id"]: s for s in iterate_shards(shard_urls(folder, manifest, split, "gallery"))}
        for sample in read[:5]:
            chain = [p["product_id"] for p in sample["json"]["products"]]
            turns = sample["json"]["session"]["turns"]
            assert chain == [turns[0]["source_id"]] + [t["target_id"] for t in turns]
            for k, pid in enumerate(chain):  # the views are the gallery's own
                assert sample[f"p{k}v0.jpg"].tobytes() == gallery[pid]["view0.jpg"].tobytes()
    assert manifest["source"]["sessions"]["chained_from"] == "triplets"


def _keys(batch: dict) -> list[tuple[str, str]]:
    return list(zip(batch["session_id"], batch["target_id"], strict=True))


def test_session_training_covers_every_session_once_and_resumes_exactly(folder: Path) -> None:
    n = read_manifest(folder)["splits"]["train"]["sessions"]
    loader = _dm(folder, train_on="sessions").train_dataloader()
    batches = [_keys(b) for b in loader]
    assert len(batches) == n // 4 == len(loader)
    sessions = [s for b in batches for s, _ in b]
    assert len(set(sessions)) == 4 * len(batches)  # 4 sessions a batch, none twice, n mod 4 left out
    assert all(len(b) >= 8 for b in batches)  # each session 2+ turns, one row each
    resumed = _dm(folder, train_on="sessions").train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches": 3})
    assert [_keys(b) for b in resumed] == batches[3:]
    # The triplet loader is unchanged by default.
    assert "session_index" not in next(iter(_dm(folder).train_dataloader()))


def test_session_evaluation_is_a_third_loader_of_every_turn(folder: Path) -> None:
    assert len(_dm(folder).val_dataloader()) == 2
    loaders = _dm(folder, eval_sessions=True).val_dataloader()
    assert len(loaders) == 3
    rows = [r for b in loaders[2] for r in zip(b["session_id"], b["turn_index"], b["text"], strict=True)]
    entry = read_manifest(folder)["splits"]["val"]
    assert len(rows) == sum(int(k) * v for k, v in entry["session_lengths"].items())
    assert len({(s, t) for s, t, _ in rows}) == len(rows)
    sessions = {s["json"]["session"]["session_id"]: s["json"]["session"]["turns"]
                for s in iterate_shards(shard_urls(folder, read_manifest(folder), "val", "sessions"))}
    # Evaluation reads the short text of each turn.
    assert all(text == sessions[s][t]["modification_short"] for s, t, text in rows)


def test_sessions_asked_of_a_folder_without_them_are_refused(tmp_path: Path) -> None:
    from datamodules.synthetic import write_synthetic

    write_synthetic(tmp_path, products=60, seed=1)
    with pytest.raises(ValueError, match="data.init_args.train_on: .* has no sessions"):
        _dm(tmp_path, train_on="sessions").prepare_data()
    with pytest.raises(ValueError, match="data.init_args.eval_sessions: .* has no sessions"):
        _dm(tmp_path, eval_sessions=True).val_dataloader()
    with pytest.raises(ValueError, match="bucket_batches=0"):
        _dm(tmp_path, train_on="sessions", bucket_batches=2)
    with pytest.raises(ValueError, match="train_on='pairs'"):
        _dm(tmp_path, train_on="pairs")
