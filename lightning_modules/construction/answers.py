"""Reading the models' answers: the JSON out of the text, then the schema of each stage.

Anything that breaks the schema raises ``InvalidAnswer`` with a one-line reason; the stage runner
retries such answers a bounded number of times, then records them as failures with the raw text.
Word counts are checked against the paper's ranges with ``slack`` (0.5: from half the minimum to
1.5 times the maximum), so only answers far outside the ranges are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
THINK_END = "</think>"


class InvalidAnswer(ValueError):
    pass


def parse_json(text: str, want: type | tuple[type, ...] = (dict, list)) -> Any:
    """The first JSON object or array in ``text`` after any reasoning (servers without a reasoning
    parser send the think block inline, sometimes without its opening tag) and inside a code fence
    if there is one; prose such as "[Image 1] shows" before it is skipped."""
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    fenced = FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    decoder = json.JSONDecoder()
    error: json.JSONDecodeError | None = None
    for start, char in enumerate(text):
        if char not in "{[":
            continue
        try:
            value, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError as exc:
            error = error or exc
            continue
        if isinstance(value, want):
            return value
    raise InvalidAnswer(f"invalid JSON: {error}" if error else "no JSON in the answer")


def words(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class WordRanges:
    """The paper's word ranges (appendix A); ``short`` is "about 50 words"."""

    image: tuple[int, int] = (50, 200)
    long: tuple[int, int] = (200, 400)
    short: tuple[int, int] = (40, 60)
    modification_long: tuple[int, int] = (64, 128)
    modification_short: tuple[int, int] = (16, 32)
    slack: float = 0.5

    def check(self, field: str, text: Any, kind: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidAnswer(f"{field} is missing or not a string")
        lo, hi = getattr(self, kind)
        n = words(text)
        if not lo * (1 - self.slack) <= n <= hi * (1 + self.slack):
            raise InvalidAnswer(f"{field} has {n} words, far outside {lo}-{hi}")
        return text.strip()


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidAnswer(f"{what} is not a JSON object")
    return value


def check_captions(text: str, n_views: int, ranges: WordRanges) -> dict[str, Any]:
    """Stage 1: ``is_clothing``; for clothing one caption per view, each opening with its label."""
    answer = _object(parse_json(text, dict), "the answer")
    clothing = answer.get("is_clothing")
    if not isinstance(clothing, bool):
        raise InvalidAnswer("is_clothing is missing or not true/false")
    if not clothing:
        return {"is_clothing": False}
    captions = answer.get("image_captions")
    if not isinstance(captions, list) or len(captions) != n_views:
        got = len(captions) if isinstance(captions, list) else "no list"
        raise InvalidAnswer(f"image_captions: {got} captions for {n_views} images")
    for i, caption in enumerate(captions, 1):
        ranges.check(f"image_captions[{i}]", caption, "image")
        if not caption.lstrip().startswith(f"[Image {i}]"):
            raise InvalidAnswer(f"image_captions[{i}] does not start with [Image {i}]")
    return {"is_clothing": True, "image_captions": [c.strip() for c in captions],
            "long_caption": ranges.check("long_caption", answer.get("long_caption"), "long"),
            "short_caption": ranges.check("short_caption", answer.get("short_caption"), "short")}


def check_verification(text: str, product_ids: list[str]) -> dict[str, bool]:
    """Stage 2: one element per product, in order; {product_id: has a confirmed left/right error}."""
    answer = parse_json(text)
    if isinstance(answer, dict) and isinstance(answer.get("products"), list):
        answer = answer["products"]
    if not isinstance(answer, list) or len(answer) != len(product_ids):
        got = len(answer) if isinstance(answer, list) else "no array"
        raise InvalidAnswer(f"{got} verdicts for {len(product_ids)} products")
    out: dict[str, bool] = {}
    for i, (item, pid) in enumerate(zip(answer, product_ids, strict=True), 1):
        item = _object(item, f"verdict {i}")
        if str(item.get("product_id", pid)) != pid or item.get("product_index", i) != i:
            raise InvalidAnswer(f"verdict {i} is for {item.get('product_id')!r}, expected {pid!r}")
        analyses = item.get("caption_analyses")
        if not isinstance(analyses, list):
            raise InvalidAnswer(f"verdict {i}: caption_analyses is not a list")
        flags = [_object(a, f"verdict {i} analysis").get("has_error") for a in analyses]
        if any(not isinstance(f, bool) for f in flags):
            raise InvalidAnswer(f"verdict {i}: has_error must be true or false in every analysis")
        out[pid] = any(flags)
    return out


def check_selections(text: str, n_candidates: int, ranges: WordRanges, most: int = 2) -> list[dict[str, Any]]:
    """Stage 3: at most ``most`` distinct candidates by number (1-based), each with its views and
    both modification texts."""
    answer = _object(parse_json(text, dict), "the answer")
    selections = answer.get("selections")
    if not isinstance(selections, list) or len(selections) > most:
        raise InvalidAnswer(f"selections must be a list of at most {most}")
    out, seen = [], set()
    for i, sel in enumerate(selections, 1):
        sel = _object(sel, f"selection {i}")
        target = sel.get("target_id")
        if isinstance(target, str) and target.strip().isdigit():
            target = int(target)
        if isinstance(target, bool) or not isinstance(target, int) or not 1 <= target <= n_candidates:
            raise InvalidAnswer(f"selection {i}: target_id {target!r} is not one of the {n_candidates} candidates")
        if target in seen:
            raise InvalidAnswer(f"selection {i}: candidate {target} selected twice")
        seen.add(target)
        views = sel.get("views_involved")
        if not isinstance(views, list) or not all(isinstance(v, str) and v.strip() for v in views):
            raise InvalidAnswer(f"selection {i}: views_involved must be a list of view names")
        if len({v.strip().lower() for v in views}) < 2:  # the paper's core requirement
            raise InvalidAnswer(f"selection {i}: views_involved names {len(views)} view(s); at least 2 are needed")
        out.append({"target": target, "views_involved": [v.strip().lower() for v in views],
                    "modification_text_long": ranges.check(f"selection {i} modification_text_long",
                                                           sel.get("modification_text_long"), "modification_long"),
                    "modification_text_short": ranges.check(f"selection {i} modification_text_short",
                                                            sel.get("modification_text_short"),
                                                            "modification_short")})
    return out
