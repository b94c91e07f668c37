"""Multi-turn runs in ``cir compare`` and the final metrics table: per-turn Recall@K beside each turn's
text-blind line, turns never read as datasets."""

from __future__ import annotations

from types import SimpleNamespace

from callbacks.metrics_table import format_table
from cir.compare import build_table, run_datasets, run_turns


def _run(name: str, metrics: dict[str, float]) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(run_name=name, run_id=name * 8, start_time=0, end_time=60000),
                           data=SimpleNamespace(metrics=metrics, tags={"stage": "fit", "family": "ProCIR"}))


SESSIONS = {"val/a/recall_at_10": 0.5, "val/a/text_blind/recall_at_10": 0.3, "val/turn_1/recall_at_10": 0.6,
            "val/turn_1/text_blind/recall_at_10": 0.4, "val/turn_2/recall_at_10": 0.45,
            "val/turn_2/text_blind/recall_at_10": 0.35, "val/turn_1/chance/recall_at_10": 0.07,
            "val/turn_2/chance/recall_at_10": 0.07, "val/turn_1/queries": 96.0, "val/turn_2/queries": 96.0}


def test_compare_has_a_column_per_turn_and_line() -> None:
    single = _run("single", {"val/a/recall_at_10": 0.55, "val/a/text_blind/recall_at_10": 0.3})
    runs = [_run("sessions", SESSIONS), single]
    assert run_datasets(runs) == ["a"] and run_turns(runs) == [1, 2]
    header, rows, columns = build_table(runs, [10])
    assert columns == ["a R@10", "avg"]
    by_name = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert [h for h in header if h.startswith("turn")] == ["turn 1 R@10", "turn 1 blind R@10", "turn 2 R@10",
                                                           "turn 2 blind R@10"]
    assert [by_name["sessions"][h] for h in header if h.startswith("turn")] == ["60.0", "40.0", "45.0", "35.0"]
    assert by_name["single"]["turn 1 R@10"] == "" and by_name["sessions"]["minutes"] == "1.0"


def test_the_metrics_table_lists_turns_after_the_datasets() -> None:
    table = format_table(SESSIONS)
    lines = table.splitlines()
    turn_rows = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("sessions"))):]
                 if line[:1].isdigit()]
    assert turn_rows == [["1", "10", "0.6000", "0.4000", "0.0700", "+0.2000", "96"],
                         ["2", "10", "0.4500", "0.3500", "0.0700", "+0.1000", "96"]]
    assert not any(line.startswith("turn_") for line in lines)  # turns are no dataset rows
    assert "turn" not in format_table({"val/a/recall_at_10": 0.5})
