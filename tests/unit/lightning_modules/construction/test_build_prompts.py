"""The shipped prompts carry appendix A's instructions as facts (not its wording), and a user's
folder replaces them file by file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_modules.construction.prompts import STAGES, default_prompt, load_prompts


def _in_order(text: str, names: list[str]) -> bool:
    positions = [text.find(f'"{n}"') for n in names]
    return all(p >= 0 for p in positions) and positions == sorted(positions)


def _range(text: str, lo: int, hi: int) -> bool:
    return re.search(rf"\b{lo}\s*(?:-|to)\s*{hi}\b", text) is not None


def test_caption_prompt_facts() -> None:
    t = default_prompt("captions")
    assert _in_order(t, ["is_clothing", "image_captions", "long_caption", "short_caption"])
    assert _range(t, 50, 200) and _range(t, 200, 400) and re.search(r"about 50 words", t)
    assert "[Image 1]" in t and "never mirrored" in t
    assert re.search(r"FRONT VIEW: the left half of the picture is the wearer's RIGHT", t)
    assert re.search(r"BACK VIEW: the left half of the picture is the wearer's LEFT", t)
    assert "SIDE VIEW" in t and "BOTH" in t  # asymmetric features: picture side and wearer side
    for garment in ("jumpsuits", "sleepwear", "underwear"):
        assert garment in t
    for excluded in ("jewelry", "bags", "shoes", "hats", "belts", "sunglasses", "gloves", "socks"):
        assert excluded in t
    assert "JSON only" in t
    assert "never say which picture shows what" in t  # the product captions describe the item, not the pictures
    assert re.search(r"exact count, where they\s+sit and their colour", t) and "wearer's point of view" in t


def test_verify_prompt_facts() -> None:
    t = default_prompt("verify")
    assert _in_order(t, ["product_index", "product_id", "caption_analyses", "caption_name", "bounding_boxes", "element",
                         "bbox", "position_in_image", "reasoning", "has_error"])
    assert "0-1000" in t and "[x_min, y_min, x_max, y_max]" in t and _range(t, 100, 400)
    assert "normally 5" in t and "SIDE VIEW" in t and "ONLY when a left/right" in t
    assert re.search(r"FRONT VIEW.*picture's left is the wearer's RIGHT", t, re.S)
    assert re.search(r"BACK VIEW.*picture's left is the wearer's LEFT", t, re.S)
    assert "Do not invent mistakes" in t
    assert re.search(r"Missing features,\s+wrong counts, wrong colours", t) and "ignore them" in t


def test_triplet_prompt_facts() -> None:
    t = default_prompt("triplets")
    assert _in_order(t, ["selections", "target_id", "same_category_check", "views_involved", "difficulty_reasoning",
                         "modification_text_long", "modification_text_short"])
    assert _range(t, 64, 128) and _range(t, 16, 32)
    assert "exactly 2 selections" in t and "at least 2" in t and "same gender" in t
    assert "[Product 1]" in t and "side by side horizontally" in t
    for detail in ("stitching", "seams", "pockets", "collars", "hems", "closures", "panels"):
        assert detail in t
    assert "exactly the source's sub-category" in t and "each of those views adds information" in t
    assert "reject candidates" in t and "nearly identical" in t


def test_a_prompt_folder_replaces_files_and_refuses_unknown_names(tmp_path: Path) -> None:
    (tmp_path / "triplets.txt").write_text("verbatim appendix A.3 text")
    prompts = load_prompts(tmp_path)
    assert prompts["triplets"].text == "verbatim appendix A.3 text"
    assert prompts["triplets"].source == str(tmp_path / "triplets.txt")
    assert prompts["captions"].text == default_prompt("captions")  # the others stay ours
    assert set(prompts) == set(STAGES)
    (tmp_path / "triplet.txt").write_text("typo")
    with pytest.raises(ValueError, match="unknown prompt files"):
        load_prompts(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_prompts(tmp_path / "missing")
