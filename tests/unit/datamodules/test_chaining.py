"""Chaining a shard folder's triplets into sessions: the chains counted by hand, the sessions valid and
copied from the gallery, a rerun replacing them, a kill leaving the old manifest whole, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from datamodules.converters import chaining
from datamodules.converters.chaining import chain_folder, chain_table, read_triplets
from datamodules.schema import Product, Triplet
from datamodules.shards import ShardSetWriter, encode_product, iterate_shards, read_manifest, write_manifest

# a → b → c → d, b → e, plus a triplet to a product outside the gallery (x) and a query-only one.
EDGES = [("a", "b"), ("b", "c"), ("c", "d"), ("b", "e"), ("d", "x"), ("e", None)]
# By hand: 1 turn: the 4 in-gallery edges; 2: a-b-c, b-c-d, a-b-e; 3: a-b-c-d.
CHAINS = {1: 4, 2: 3, 3: 1}


def _folder(root: Path, edges: list[tuple[str, str | None]] = EDGES, split: str = "val") -> Path:
    colours = {p: (40 * n, 250 - 40 * n, 90) for n, p in enumerate("abcdef")}
    products = {p: encode_product(Product(p, "gen", "dress", [Image.new("RGB", (16, 16), c)] * (1 + n % 2),
                                          ["front", "back"][:1 + n % 2]))
                for n, (p, c) in enumerate(colours.items())}
    writer = ShardSetWriter(root, split, maxcount=3)
    for p in products.values():
        writer.write_product(*p)
    for src, tgt in edges:
        target = products.get(tgt) if tgt else None
        writer.write_triplet(Triplet(src, tgt, "gen", f"{src} to {tgt}"), products[src], target)
    write_manifest(root, {split: writer.close()}, ["gen"], {"converter": "test"})
    return root


def _sessions(root: Path, split: str = "val") -> list[dict]:
    entry = read_manifest(root)["splits"][split]
    return list(iterate_shards([str(root / n) for n in entry["shards"]["sessions"]]))


def test_chains_are_counted_and_sessions_written_from_the_gallery(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    gallery = {s["json"]["product_id"]: s for s in iterate_shards(
        [str(root / n) for n in read_manifest(root)["splits"]["val"]["shards"]["gallery"]])}
    reports = chain_folder(root, min_turns=2, max_turns=5, seed=0)
    assert reports["val"]["chains"] == {"gen": CHAINS} and reports["val"]["usable"] == 4
    entry = read_manifest(root)["splits"]["val"]
    sessions = _sessions(root)
    assert entry["sessions"] == len(sessions) >= 1
    assert sum(int(k) * v for k, v in entry["session_lengths"].items()) <= 4
    used = set()
    for s in sessions:
        turns = s["json"]["session"]["turns"]
        chain = [turns[0]["source_id"]] + [t["target_id"] for t in turns]
        assert all(t["modification_short"] == f"{t['source_id']} to {t['target_id']}" for t in turns)
        assert all((t["source_id"], t["target_id"]) in EDGES for t in turns)
        assert not used & {(t["source_id"], t["target_id"]) for t in turns}  # disjoint
        used |= {(t["source_id"], t["target_id"]) for t in turns}
        assert [p["product_id"] for p in s["json"]["products"]] == chain
        for k, pid in enumerate(chain):  # the gallery's views, pixel for pixel (the bytes are copied)
            views = [s[f"p{k}v{i}.jpg"] for i in range(2) if f"p{k}v{i}.jpg" in s]
            assert [v.tobytes() for v in views] == [gallery[pid][f"view{i}.jpg"].tobytes() for i in range(len(views))]
    table = chain_table(reports)
    assert "val" in table and "gen" in table


def test_a_rerun_replaces_the_sessions(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    chain_folder(root, seed=0)
    first = [s["json"] for s in _sessions(root)]
    names = read_manifest(root)["splits"]["val"]["shards"]["sessions"]
    # What a run killed while writing its tars leaves: its temporary folder, an orphan of a new generation.
    (root / f"{chaining.TEMP_PREFIX}999" / "x").mkdir(parents=True)
    (root / "val-sessions-c9-000000.tar").write_bytes(b"half a tar")
    chain_folder(root, seed=0)
    again = read_manifest(root)["splits"]["val"]["shards"]["sessions"]
    assert [s["json"] for s in _sessions(root)] == first
    assert set(names).isdisjoint(again)  # a new generation, the old one deleted
    assert sorted(p.name for p in root.glob("*-sessions-*.tar")) == sorted(again)
    assert not list(root.glob(f"{chaining.TEMP_PREFIX}*"))
    # The triplets are untouched; the manifest keeps its other keys.
    assert len(read_triplets(root, read_manifest(root)["splits"]["val"])) == len(EDGES)
    assert read_manifest(root)["source"]["converter"] == "test"


def test_a_kill_before_the_manifest_leaves_the_old_one_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path)
    chain_folder(root, seed=0)
    before = (root / "manifest.json").read_text()
    old = [s["json"] for s in _sessions(root)]

    def killed(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # as a kill: nothing after this point runs

    monkeypatch.setattr(chaining, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        chain_folder(root, seed=5, max_turns=2)
    monkeypatch.undo()
    assert (root / "manifest.json").read_text() == before
    assert [s["json"] for s in _sessions(root)] == old  # the old tars are still there, whole
    assert len(list(root.glob("*-sessions-*.tar"))) > len(json.loads(before)["splits"]["val"]["shards"]["sessions"])
    chain_folder(root, seed=0)  # the rerun clears what the killed run left
    assert sorted(p.name for p in root.glob("*-sessions-*.tar")) == \
        sorted(read_manifest(root)["splits"]["val"]["shards"]["sessions"])


def test_a_folder_without_chains_keeps_its_entries(tmp_path: Path) -> None:
    root = _folder(tmp_path, [("a", "b"), ("c", "d")])
    reports = chain_folder(root)
    assert reports["val"]["sessions"] == {}
    entry = read_manifest(root)["splits"]["val"]
    assert "sessions" not in entry and "sessions" not in entry["shards"]
    with pytest.raises(ValueError, match="min-turns"):
        chain_folder(root, min_turns=3, max_turns=2)


def test_cir_data_sessions_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cir.data import main

    root = _folder(tmp_path)
    main(["sessions", str(root), "--max-turns", "3", "--seed", "1"])
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split() == ["split", "dataset", "chains/1", "chains/2", "chains/3", "sessions/2", "sessions/3",
                              "sessions"]
    assert row.split()[:5] == ["val", "gen", "4", "3", "1"]
    assert read_manifest(root)["source"]["sessions"] == {"chained": True, "min_turns": 2, "max_turns": 3, "seed": 1}
