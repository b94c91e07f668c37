from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.converters import convert_fashioniq, convert_fashionmv, extract_fashiongen_h5
from datamodules.shards import iterate_shards, read_manifest, shard_urls
from datamodules.synthetic import generate
from datamodules.synthetic.layouts import write_fashioniq_layout, write_fashionmv_layout

SHARED_FIQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashioniq"


@pytest.fixture(scope="module")
def data():
    return generate(240, seed=5)


def _expected_fashioniq(root: Path, present: set[str], categories=("dress", "shirt", "toptee"),
                        splits=("train", "val", "test")) -> dict:
    """Counts derived straight from the annotation files and the set of images on disk."""
    out = {}
    for c in categories:
        for s in splits:
            names = json.loads((root / "image_splits" / f"split.{c}.{s}.json").read_text())
            caps = json.loads((root / "captions" / f"cap.{c}.{s}.json").read_text())
            ok = [e for e in caps if e["candidate"] in present and ("target" not in e or e["target"] in present)]
            out.setdefault(c, {})[s] = {
                "gallery_written": sum(n in present for n in names),
                "gallery_missing": sum(n not in present for n in names),
                "triplets_written": len(ok), "triplets_skipped": len(caps) - len(ok)}
    return out


def test_fashioniq_layout_end_to_end_with_missing_and_broken_images(data, tmp_path: Path) -> None:
    root = tmp_path / "fiq"
    write_fashioniq_layout(root, data)
    images = sorted((root / "images").glob("*.jpg"))
    for p in images[::9]:  # a partial copy: some images missing ...
        p.unlink()
    (images[1]).write_bytes(b"\xff\xd8 not a jpeg")  # ... and one unreadable
    present = {p.stem for p in (root / "images").glob("*.jpg")} - {images[1].stem}
    summary = convert_fashioniq(root, tmp_path / "out")
    assert summary == _expected_fashioniq(root, present)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary

    manifest = read_manifest(tmp_path / "out")
    assert manifest["datasets"] == ["fashioniq_dress", "fashioniq_shirt", "fashioniq_toptee"]
    val = list(iterate_shards(shard_urls(tmp_path / "out", manifest, "val", "triplets")))
    assert len(val) == sum(summary[c]["val"]["triplets_written"] for c in summary)
    t = val[0]["json"]["triplet"]
    c1, c2 = (x.strip(".?, ") for x in t["relative_captions"])
    assert t["modification_short"] == f"{c1.capitalize()} and {c2.lower()}"
    test = list(iterate_shards(shard_urls(tmp_path / "out", manifest, "test", "triplets")))
    assert test and all(s["json"]["triplet"]["target_id"] is None and "tgt0.jpg" not in s for s in test)


def test_fashionmv_layout_end_to_end_with_nested_ids_and_missing_products(data, tmp_path: Path) -> None:
    root = tmp_path / "fmv"
    write_fashionmv_layout(root, data)
    folders = sorted(p for p in (root / "images").glob("*/*/*") if p.is_dir())
    removed = folders[3]
    shutil.rmtree(removed)
    first = json.loads((root / "val_triplets.jsonl").read_text().splitlines()[0])
    broken_dir = root / "images" / first["dataset"] / first["source_id"]
    assert broken_dir != removed
    broken_views = sorted(broken_dir.iterdir())
    broken_views[0].write_bytes(b"garbage")

    summary = convert_fashionmv(root, tmp_path / "out")
    for split in ("train", "val"):
        triplets = [json.loads(line) for line in (root / f"{split}_triplets.jsonl").read_text().splitlines()]
        for ds in {t["dataset"] for t in triplets}:
            ids = {t[k] for t in triplets if t["dataset"] == ds for k in ("source_id", "target_id")}
            gone = {i for i in ids if root / "images" / ds / i == removed}
            of_ds = [t for t in triplets if t["dataset"] == ds]
            ok = [t for t in of_ds if not {t["source_id"], t["target_id"]} & gone]
            assert summary[ds][split] == {"products_written": len(ids) - len(gone), "products_missing": len(gone),
                                          "triplets_written": len(ok), "triplets_skipped": len(of_ds) - len(ok)}

    manifest = read_manifest(tmp_path / "out")
    gallery = {s["json"]["raw_id"]: s for split in ("train", "val")
               for s in iterate_shards(shard_urls(tmp_path / "out", manifest, split, "gallery"))}
    raw = first["source_id"]
    if len(broken_views) > 1:  # the unreadable view is dropped, the others kept, in file-name order
        meta = gallery[raw]["json"]
        assert meta["view_names"] == [p.stem for p in broken_views[1:]]
        layout = {json.loads(line)["product_id"]: json.loads(line)
                  for split in ("train", "val") for line in (root / f"{split}_captions.jsonl").read_text().splitlines()}
        assert meta["view_captions"] == layout[raw]["image_captions"][1:]
    some = next(iter(gallery.values()))["json"]
    assert "/" in some["raw_id"] and "/" not in some["product_id"]
    assert len(some["view_captions"]) == len(some["view_names"])
    assert some["long_caption"] and some["short_caption"]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_FIQ.is_dir(), reason="../shared/data/fashioniq is not present")
def test_real_fashioniq_annotations_convert_with_the_right_counts(tmp_path: Path) -> None:
    root = tmp_path / "fiq"
    (root / "images").mkdir(parents=True)
    (root / "captions").symlink_to(SHARED_FIQ / "captions")
    (root / "image_splits").symlink_to(SHARED_FIQ / "image_splits")
    names = sorted({n for p in (SHARED_FIQ / "image_splits").glob("*.json") for n in json.loads(p.read_text())})
    assert len(names) > 70_000  # the real image lists, not a stub
    present = set(names[::6])  # placeholder images for a subset, as in an incomplete real copy
    buf = Image.new("RGB", (4, 4), (128, 64, 32))
    for n in present:
        buf.save(root / "images" / f"{n}.jpg")
    summary = convert_fashioniq(root, tmp_path / "out")
    assert summary == _expected_fashioniq(root, present)
    totals = {s: sum(summary[c][s]["triplets_written"] + summary[c][s]["triplets_skipped"] for c in summary)
              for s in ("train", "val", "test")}
    assert totals == {"train": 5985 + 5988 + 6027, "val": 2017 + 2038 + 1961, "test": 2024 + 2038 + 2056}
    assert summary["dress"]["val"]["gallery_written"] + summary["dress"]["val"]["gallery_missing"] == 3817


def test_fashiongen_h5_extraction(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    ids = np.array([101, 101, 102, 101, 103, 103, 103, 103, 103, 103, 103])
    images = np.stack([np.full((8, 8, 3), 20 * i, dtype=np.uint8) for i in range(len(ids))])
    with h5py.File(tmp_path / "fg.h5", "w") as f:
        f["input_productID"] = ids[:, None]
        f["input_image"] = images
    counts = extract_fashiongen_h5(tmp_path / "fg.h5", tmp_path / "root")
    assert counts == {"products": 3, "images": 3 + 1 + 5, "images_over_max_views": 2}
    folder = tmp_path / "root" / "images" / "fashiongen_val"
    assert sorted(p.name for p in (folder / "101").iterdir()) == ["00.jpg", "01.jpg", "02.jpg"]
    assert len(list((folder / "103").iterdir())) == 5
    # Extracted images then convert as FashionMV products.
    assert np.asarray(Image.open(folder / "102" / "00.jpg")).mean() == pytest.approx(40, abs=3)
