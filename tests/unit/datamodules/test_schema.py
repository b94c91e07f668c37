from __future__ import annotations

import pytest
from PIL import Image

from datamodules.schema import Product, SchemaError, Triplet, safe_key


def _img() -> Image.Image:
    return Image.new("RGB", (8, 8))


def test_product_accepts_one_to_five_views() -> None:
    for n in (1, 5):
        p = Product("p1", "ds", "dress", [_img()] * n, ["front"] * n)
        assert "views" not in p.meta() and p.meta()["product_id"] == "p1"


@pytest.mark.parametrize("n", [0, 6, 9])
def test_product_rejects_view_counts_outside_range(n: int) -> None:
    with pytest.raises(SchemaError, match="1 to 5"):
        Product("p1", "ds", "dress", [_img()] * n, ["front"] * n)


def test_keys_with_dots_are_rejected_with_the_fix() -> None:
    with pytest.raises(SchemaError, match="safe_key"):
        Product("img.001", "ds", "dress", [_img()], ["front"])
    assert safe_key("women/dress/img.001") == "women_dress_img_001"


def test_triplet_validation() -> None:
    with pytest.raises(SchemaError, match="same"):
        Triplet("a", "a", "ds", "make it red")
    with pytest.raises(SchemaError, match="empty"):
        Triplet("a", "b", "ds", "   ")
    t = Triplet("a", "b", "ds", "make it red", views_involved=["front"])
    assert t.key == "a--b" and "." not in t.key


def test_triplet_groups_and_view_incompleteness_default_to_absent() -> None:
    t = Triplet("a", "b", "ds", "make it red")
    assert t.subset_ids == [] and t.view_incomplete is False
    assert {"subset_ids", "view_incomplete"} <= set(t.meta())
    # A triplet as shards written before these fields existed hold it.
    old = {k: v for k, v in t.meta().items() if k not in ("subset_ids", "view_incomplete")}
    assert Triplet(**old).meta() == t.meta()
    grouped = Triplet("a", "b", "ds", "make it red", subset_ids=["b", "c"], view_incomplete=True)
    assert grouped.meta()["subset_ids"] == ["b", "c"] and grouped.meta()["view_incomplete"] is True


@pytest.mark.parametrize("subset", [["a", "b"], ["c", "d"], ["b", "c.1"]])
def test_a_subset_must_hold_the_target_and_not_the_source(subset: list[str]) -> None:
    with pytest.raises(SchemaError, match="subset_ids"):
        Triplet("a", "b", "ds", "make it red", subset_ids=subset)
