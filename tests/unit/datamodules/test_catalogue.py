from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from datamodules.catalogue import CatalogueProduct, assign_splits, read_catalogue


def _img(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_nested_ids_sorted_views_at_most_five_and_unreadable_files(tmp_path: Path) -> None:
    for name in ("03.png", "01.jpg", "02.webp", "00.jpeg", "05.jpg", "04.jpg"):
        _img(tmp_path / "images" / "dresses" / "summer" / "p1" / name)
    (tmp_path / "images" / "dresses" / "summer" / "p1" / "notes.txt").write_text("not an image")
    _img(tmp_path / "images" / "p2" / "a.jpg")
    (tmp_path / "images" / "p2" / "b.jpg").write_bytes(b"broken")
    whole = tmp_path / "whole.jpg"
    Image.effect_noise((64, 64), 40).convert("RGB").save(whole, quality=95)
    (tmp_path / "images" / "p3").mkdir(parents=True)
    # Half a real JPEG: PIL identifies it, verify() passes it, decoding fails.
    (tmp_path / "images" / "p3" / "x.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    rows = [{"product_id": "dresses/summer/p1", "dataset": "shop", "category": "dress", "gender": "women",
             "title": "Summer dress", "split": "val"}, {"product_id": "p4"}]
    (tmp_path / "products.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cat = read_catalogue(tmp_path)
    by_id = cat.by_id()
    assert sorted(by_id) == ["dresses/summer/p1", "p2"]
    p1 = by_id["dresses/summer/p1"]
    assert [v.name for v in p1.views] == ["00.jpeg", "01.jpg", "02.webp", "03.png", "04.jpg"]
    assert (p1.dataset, p1.category, p1.gender, p1.title, p1.split) == ("shop", "dress", "women", "Summer dress", "val")
    assert [v.name for v in by_id["p2"].views] == ["a.jpg"] and by_id["p2"].dataset == "catalogue"
    # p3: its only file is unreadable; p4: listed, no folder.
    assert cat.counts == {"products_in": 4, "no_readable_images": 2, "unreadable_views": 2, "without_category": 1}


def test_bad_metadata_lines_are_named(tmp_path: Path) -> None:
    _img(tmp_path / "images" / "p1" / "a.jpg")
    (tmp_path / "products.jsonl").write_text('{"product_id": "p1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"products.jsonl:2: not valid JSON"):
        read_catalogue(tmp_path)
    (tmp_path / "products.jsonl").write_text('{"product_id": "p1"}\n{"product_id": "p1", "title": "again"}\n')
    with pytest.raises(ValueError, match=r"products.jsonl:2: product_id 'p1' is listed twice"):
        read_catalogue(tmp_path)
    (tmp_path / "products.jsonl").write_text('{"product_id": "p1", "split": "test"}\n')
    with pytest.raises(ValueError, match=r"products.jsonl:1: split 'test'"):
        read_catalogue(tmp_path)
    with pytest.raises(FileNotFoundError, match="no images/ folder"):
        read_catalogue(tmp_path / "nowhere")


def test_split_is_exact_per_dataset_disjoint_keeps_native_splits_and_ignores_order() -> None:
    products = [CatalogueProduct(f"a{i}", "A", []) for i in range(100)] + \
               [CatalogueProduct(f"b{i}", "B", []) for i in range(40)] + \
               [CatalogueProduct("native", "B", [], split="val")]
    split = assign_splits(products, 0.2, seed=7)
    assert set(split) == {p.product_id for p in products}  # every product in exactly one split
    assert sum(split[f"a{i}"] == "val" for i in range(100)) == 20
    assert sum(split[f"b{i}"] == "val" for i in range(40)) == 8
    assert split["native"] == "val"
    assert assign_splits(list(reversed(products)), 0.2, seed=7) == split
    assert assign_splits(products, 0.2, seed=8) != split
    with pytest.raises(ValueError, match="val-fraction"):
        assign_splits(products, 1.0)
