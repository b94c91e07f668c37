"""``cir compare``'s runs table: each run beside its own text-blind line, reference lines never read
as datasets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cir.compare import build_table


def _run(name: str, metrics: dict[str, float]) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(run_name=name, run_id=name * 8, start_time=0, end_time=120000),
                           data=SimpleNamespace(metrics=metrics, tags={"stage": "fit", "family": "CLIP4CIR"}))


def test_the_gain_is_the_run_average_minus_its_text_blind_average() -> None:
    new = _run("new", {"val/a/recall_at_10": 0.6, "val/b/recall_at_10": 0.4, "val/a/text_blind/recall_at_10": 0.2,
                       "val/b/text_blind/recall_at_10": 0.1, "val/text_blind/recall_at_10": 0.15,
                       "val/chance/recall_at_10": 0.05, "val/view_incomplete/recall_at_10": 0.3})
    old = _run("old", {"val/a/recall_at_10": 0.7, "val/b/recall_at_10": 0.5})  # logged before the line existed
    header, rows, columns = build_table([new, old], [10])
    assert columns == ["a R@10", "b R@10", "avg"]  # text_blind, chance, view_incomplete are no datasets
    by_name = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert float(by_name["new"]["text-blind avg"]) == pytest.approx(15.0)
    assert float(by_name["new"]["gain"].rstrip("*")) == pytest.approx(35.0)
    assert by_name["old"]["gain"] == "" and by_name["old"]["text-blind avg"] == ""
