"""The schema checks refuse what the paper's formats forbid, and read what models really send."""

from __future__ import annotations

import json

import pytest

from lightning_modules.construction.answers import (
    InvalidAnswer,
    WordRanges,
    check_captions,
    check_selections,
    check_verification,
    parse_json,
)

R = WordRanges()


def _words(n: int, head: str = "") -> str:
    return (head + " " + " ".join(["word"] * n)).strip()


def _captions(n_views: int, per_image: int = 60) -> dict:
    return {"is_clothing": True, "image_captions": [_words(per_image, f"[Image {k}]") for k in range(1, n_views + 1)],
            "long_caption": _words(250), "short_caption": _words(45)}


def test_json_is_found_after_a_think_block_and_inside_a_fence() -> None:
    assert parse_json('<think>{"no": 1}</think> Sure: ```json\n{"a": [1, 2]}\n``` done') == {"a": [1, 2]}
    assert parse_json('text before [{"x": 1}] text after') == [{"x": 1}]
    # Prose with brackets before the answer, and a think block served without its opening tag.
    assert parse_json('Looking at [Image 1] and [Image 2]: {"is_clothing": false}', dict) == {"is_clothing": False}
    assert parse_json('weighing {left} and {right}...</think>\n{"a": 1}') == {"a": 1}
    assert parse_json('boxes [0, 0, 500, 1000], so {"a": 2}', dict) == {"a": 2}
    with pytest.raises(InvalidAnswer, match="no JSON"):
        parse_json("I cannot help with that")
    with pytest.raises(InvalidAnswer, match="invalid JSON"):
        parse_json('{"a": ')


def test_caption_answers() -> None:
    ok = check_captions(json.dumps(_captions(3)), 3, R)
    assert ok["is_clothing"] and len(ok["image_captions"]) == 3
    assert check_captions('{"is_clothing": false}', 2, R) == {"is_clothing": False}
    with pytest.raises(InvalidAnswer, match="2 captions for 3 images"):
        check_captions(json.dumps(_captions(2)), 3, R)
    swapped = _captions(2)
    swapped["image_captions"].reverse()
    with pytest.raises(InvalidAnswer, match=r"does not start with \[Image 1\]"):
        check_captions(json.dumps(swapped), 2, R)
    with pytest.raises(InvalidAnswer, match="far outside 50-200"):
        check_captions(json.dumps(_captions(2, per_image=10)), 2, R)
    assert check_captions(json.dumps(_captions(2, per_image=30)), 2, R)  # short of 50, not far outside
    with pytest.raises(InvalidAnswer, match="is_clothing"):
        check_captions('{"is_clothing": "yes"}', 1, R)


def test_verification_answers() -> None:
    answer = [{"product_index": 1, "product_id": "a/1", "caption_analyses": [{"has_error": False}]},
              {"product_index": 2, "product_id": "b", "caption_analyses": [{"has_error": False}, {"has_error": True}]}]
    assert check_verification(json.dumps(answer), ["a/1", "b"]) == {"a/1": False, "b": True}
    with pytest.raises(InvalidAnswer, match="1 verdicts for 2 products"):
        check_verification(json.dumps(answer[:1]), ["a/1", "b"])
    with pytest.raises(InvalidAnswer, match="expected 'c'"):
        check_verification(json.dumps(answer), ["a/1", "c"])
    answer[0]["caption_analyses"][0]["has_error"] = "no"
    with pytest.raises(InvalidAnswer, match="true or false"):
        check_verification(json.dumps(answer), ["a/1", "b"])


def _selection(target: object) -> dict:
    return {"target_id": target, "views_involved": ["Front", "back"], "modification_text_long": _words(80),
            "modification_text_short": _words(20)}


def test_selection_answers() -> None:
    got = check_selections(json.dumps({"selections": [_selection(3), _selection("10")]}), 10, R)
    assert [s["target"] for s in got] == [3, 10] and got[0]["views_involved"] == ["front", "back"]
    assert check_selections('{"selections": []}', 10, R) == []
    for bad, reason in [(11, "not one of the 10"), (0, "not one of"), (True, "not one of"), ("x", "not one of")]:
        with pytest.raises(InvalidAnswer, match=reason):
            check_selections(json.dumps({"selections": [_selection(bad)]}), 10, R)
    with pytest.raises(InvalidAnswer, match="selected twice"):
        check_selections(json.dumps({"selections": [_selection(2), _selection(2)]}), 10, R)
    with pytest.raises(InvalidAnswer, match="at most 2"):
        check_selections(json.dumps({"selections": [_selection(1), _selection(2), _selection(3)]}), 10, R)
    with pytest.raises(InvalidAnswer, match="at least 2 are needed"):
        check_selections(json.dumps({"selections": [_selection(1) | {"views_involved": ["front", "Front"]}]}), 10, R)
    long_text = _selection(1) | {"modification_text_short": _words(60)}
    with pytest.raises(InvalidAnswer, match="far outside 16-32"):
        check_selections(json.dumps({"selections": [long_text]}), 10, R)
