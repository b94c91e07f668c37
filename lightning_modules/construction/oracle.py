"""The oracle backend: answers every stage from the generated catalogue's ground truth.

It stands in for a model where no model can run (CPU tests, demos, throughput benchmarks) and
exercises every path of the pipeline with known answers: accessories are reported as not
clothing; products marked ``lr_error`` get captions with left and right swapped, and the
verifier flags exactly those; the triplet stage picks, among the candidates it is shown, the ones
the generator can describe a change to, seen in at least 2 views. It reads the request's tag
(stage, product ids), never the pixels.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.jsonl import numbered_json_lines
from datamodules.schema import safe_key
from datamodules.synthetic.generate import ProductSpec, triplet_between
from datamodules.synthetic.text import LONG_FILLER, long_caption, short_caption, view_caption

from ..generation.chat import ChatRequest, Completion, OnResult

PAPER_VIEW = {"front": "front", "back": "back", "side_left": "side", "side_right": "side", "detail": "detail"}
SIDE = re.compile(r"\b(left|right)\b")


def _pad(text: str, lo: int, offset: int) -> str:
    fill = 0
    while len(text.split()) < lo:
        text += " " + LONG_FILLER[(offset + fill) % len(LONG_FILLER)]
        fill += 1
    return text


def _swap_sides(text: str) -> str:
    return SIDE.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


class OracleChat:
    name = "oracle"

    def __init__(self, ground_truth: str | Path) -> None:
        path = Path(ground_truth)
        if not path.is_file():
            raise FileNotFoundError(f"oracle ground truth {path} not found: the oracle only knows catalogues written "
                                    "by `cir data synthetic --layout catalogue` (which writes ground_truth.jsonl)")
        rewrite = "; rewrite the catalogue with `cir data synthetic --layout catalogue`"
        self.truth: dict[str, dict[str, Any]] = {}
        for n, row in numbered_json_lines(path, path.read_text().splitlines(), rewrite):
            if not isinstance(row, dict) or "product_id" not in row:
                raise ValueError(f"{path}:{n}: not a ground-truth record (no product_id){rewrite}")
            self.truth[row["product_id"]] = row

    def _spec(self, pid: str) -> ProductSpec:
        t = self.truth[pid]
        return ProductSpec(safe_key(pid), t["dataset"], t["attributes"], t["view_names"], seed=0)

    def captions(self, pid: str) -> dict[str, Any]:
        t = self.truth[pid]
        if not t["clothing"]:
            return {"is_clothing": False, "image_captions": [], "long_caption": "", "short_caption": ""}
        attrs, views = t["attributes"], t["view_names"]
        rng = random.Random(pid)
        per_view = [view_caption(attrs, v) for v in views]
        answer = {"is_clothing": True,
                  "image_captions": [_pad(f"[Image {k}] {c}", 50, k) for k, c in enumerate(per_view, 1)],
                  "long_caption": _pad(f"{long_caption(attrs, rng, views)} {' '.join(per_view)}", 200, 0),
                  "short_caption": _pad(short_caption(attrs, rng, views), 40, 3)}
        if t["lr_error"]:
            answer = {k: [_swap_sides(c) for c in v] if isinstance(v, list) else
                      (_swap_sides(v) if isinstance(v, str) else v) for k, v in answer.items()}
        return answer

    def verdicts(self, pids: list[str]) -> list[dict[str, Any]]:
        return [{"product_index": k, "product_id": pid,
                 "caption_analyses": [{"caption_name": "image_caption_1", "bounding_boxes": [],
                                       "reasoning": "Sides checked against the ground truth.",
                                       "has_error": bool(self.truth[pid]["lr_error"])}]}
                for k, pid in enumerate(pids, 1)]

    def selections(self, source: str, candidates: list[str], most: int = 2) -> dict[str, Any]:
        src = self._spec(source)
        picks = []
        for k, cid in enumerate(candidates, 1):
            cand = self.truth[cid]
            if not cand["clothing"] or cand["attributes"]["category"] != src.attributes["category"]:
                continue
            triplet = triplet_between(src, self._spec(cid), random.Random(f"{source}->{cid}"))
            if triplet is None:
                continue
            views = list(dict.fromkeys(PAPER_VIEW[v] for v in triplet.views_involved))
            if len(views) >= 2:
                picks.append((len(triplet.changes), k, triplet, views))
        picks.sort(key=lambda p: p[:2])
        return {"selections": [
            {"target_id": k, "same_category_check": "Same category.", "views_involved": views,
             "difficulty_reasoning": "Each named view shows one of the changes.",
             "modification_text_long": t.modification_long, "modification_text_short": t.modification_short}
            for _, k, t, views in picks[:most]]}

    def answer(self, tag: dict[str, Any]) -> Any:
        stage = tag.get("stage")
        if stage == "captions":
            return self.captions(tag["products"][0])
        if stage == "verify":
            return self.verdicts(tag["products"])
        if stage == "triplets":
            return self.selections(tag["source"], tag["candidates"])
        raise ValueError(f"the oracle cannot answer a request tagged {tag!r}")

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        for i, request in enumerate(requests):
            text = json.dumps(self.answer(request.tag))
            texts = [p for p in request.user if isinstance(p, str)] + [request.system or ""]
            prompt = sum(len(t.split()) for t in texts)
            on_result(i, Completion(text, prompt_tokens=prompt, completion_tokens=len(text.split())))

    def close(self) -> None:
        pass
