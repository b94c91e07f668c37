"""Sessions chained from the converted datasets: the converters' ``--sessions`` option on the generated
data in FashionIQ's and FashionMV's layouts, and the real FashionIQ annotations (chain counts per
category, split and length; a conversion with stand-in images into session shards)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from datamodules.converters import convert_fashioniq
from datamodules.converters.chaining import chain_folder
from datamodules.sessions import count_chains
from datamodules.shards import iterate_shards, read_manifest
from datamodules.synthetic import generate
from datamodules.synthetic.layouts import write_fashioniq_layout, write_fashionmv_layout

SHARED_FIQ = Path(__file__).resolve().parents[4] / "shared" / "data" / "fashioniq"
# count_chains over the real caption files (chains of 2-5 turns). Val's are the published numbers
# this repository was given; train's were counted here once and pinned.
REAL_CHAINS = {
    "val": {"dress": [1003, 498, 228, 98], "shirt": [624, 191, 43, 7], "toptee": [644, 199, 44, 7]},
    "train": {"dress": [2960, 1396, 662, 304], "shirt": [1822, 486, 107, 24], "toptee": [2160, 728, 225, 64]},
}


@dataclass
class T:
    source_id: str
    target_id: str | None
    dataset: str


def _captions(category: str, split: str) -> list[dict]:
    return json.loads((SHARED_FIQ / "captions" / f"cap.{category}.{split}.json").read_text())


def _check_sessions(out: Path, split: str, pairs: Counter[tuple[str, str, str]]) -> Counter[int]:
    """Every session is a chain of the split's triplets, no triplet used more often than it exists."""
    entry = read_manifest(out)["splits"][split]
    lengths: Counter[int] = Counter()
    used: Counter[tuple[str, str, str]] = Counter()
    for s in iterate_shards([str(out / n) for n in entry["shards"]["sessions"]]):
        turns = s["json"]["session"]["turns"]
        assert all(a["target_id"] == b["source_id"] for a, b in zip(turns, turns[1:], strict=False))
        used.update((t["dataset"], t["source_id"], t["target_id"]) for t in turns)
        lengths[len(turns)] += 1
    assert all(used[k] <= pairs[k] for k in used)
    assert {str(k): v for k, v in sorted(lengths.items())} == entry["session_lengths"]
    assert sum(lengths.values()) == entry["sessions"]
    return lengths


@pytest.mark.parametrize("layout", ["fashioniq", "fashionmv"])
def test_the_converters_sessions_option_chains_after_converting(tmp_path: Path, layout: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from cir.data import main

    data = generate(120, seed=3)
    root, out = tmp_path / "raw", tmp_path / "out"
    (write_fashioniq_layout if layout == "fashioniq" else write_fashionmv_layout)(root, data)
    main([layout, "--root", str(root), "--out", str(out), "--splits", "train", "val", "--sessions",
          "--max-turns", "4"])
    assert "chains/4" in capsys.readouterr().out
    # The generated groups hold chains: source → other source → candidate.
    for split in ("train", "val"):
        entry = read_manifest(out)["splits"][split]
        pairs = Counter((t["json"]["triplet"]["dataset"], t["json"]["triplet"]["source_id"],
                         t["json"]["triplet"]["target_id"])
                        for t in iterate_shards([str(out / n) for n in entry["shards"]["triplets"]]))
        lengths = _check_sessions(out, split, pairs)
        assert lengths and max(lengths) <= 4


@pytest.mark.skipif(not SHARED_FIQ.is_dir(), reason="../shared/data/fashioniq is not present")
def test_real_fashioniq_chain_counts_per_category_split_and_length() -> None:
    for split, per in REAL_CHAINS.items():
        for category, expected in per.items():
            caps = _captions(category, split)
            counts = count_chains([T(c["candidate"], c["target"], category) for c in caps], max_turns=5)
            assert counts[1] == len(caps)  # no caption pairs an image with itself
            assert [counts[k] for k in range(2, 6)] == expected, (split, category)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_FIQ.is_dir(), reason="../shared/data/fashioniq is not present")
def test_real_fashioniq_val_converts_into_session_shards(tmp_path: Path) -> None:
    root = tmp_path / "fiq"
    (root / "images").mkdir(parents=True)
    (root / "captions").symlink_to(SHARED_FIQ / "captions")
    (root / "image_splits").symlink_to(SHARED_FIQ / "image_splits")
    names = {n for p in (SHARED_FIQ / "image_splits").glob("split.*.val.json") for n in json.loads(p.read_text())}
    buf = Image.new("RGB", (4, 4), (128, 64, 32))  # stand-in images for every val product
    for n in names:
        buf.save(root / "images" / f"{n}.jpg")
    out = tmp_path / "out"
    convert_fashioniq(root, out, splits=["val"])
    reports = chain_folder(out, seed=0)
    chains = reports["val"]["chains"]
    assert {ds.removeprefix("fashioniq_"): [c[k] for k in range(2, 6)] for ds, c in chains.items()} == \
        REAL_CHAINS["val"]
    pairs = Counter((f"fashioniq_{c}", e["candidate"], e["target"]) for c in REAL_CHAINS["val"]
                    for e in _captions(c, "val"))
    lengths = _check_sessions(out, "val", pairs)
    written = {ds: dict(s) for ds, s in reports["val"]["sessions"].items()}
    print("real FashionIQ val sessions written:", written, dict(lengths))
    # Sessions use at most every triplet once, and the chains are plentiful: hundreds per category.
    assert sum(k * v for k, v in lengths.items()) <= sum(pairs.values())
    assert all(sum(s.values()) > 250 for s in written.values())
