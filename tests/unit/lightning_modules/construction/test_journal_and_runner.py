"""Journals survive a torn last line; the runner retries broken answers a bounded number of times
and records the last one as a failure, raw text included."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from lightning_modules.construction.answers import InvalidAnswer, parse_json
from lightning_modules.construction.journal import Journal, read_journal
from lightning_modules.construction.runner import ServerRefused, WorkItem, finished_keys, run_stage
from lightning_modules.generation.chat import ChatRequest, Completion, OnResult


def test_a_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a", "ok": true}\n{"key": "b", "o')
    assert read_journal(path) == [{"key": "a", "ok": True}]
    with Journal(path) as j:
        j.append({"key": "c", "ok": True})
    assert [r["key"] for r in read_journal(path)] == ["a", "c"]
    assert path.read_text().endswith("\n")
    # A last line cut exactly before its newline parses, but it is torn all the same: ignored, then cut.
    path.write_text('{"key": "a", "ok": true}\n{"key": "b", "ok": true}')
    assert [r["key"] for r in read_journal(path)] == ["a"]
    with Journal(path) as j:
        assert [r["key"] for r in j.records] == ["a"]
    assert path.read_text() == '{"key": "a", "ok": true}\n'


class Scripted:
    """Answers each request from a script of texts, by its key and attempt."""

    name = "scripted"

    def __init__(self, script: dict[str, list[str]], error_keys: Sequence[str] = (),
                 status: dict[str, int] | None = None) -> None:
        self.script, self.error_keys, self.calls = script, set(error_keys), 0
        self.status = status or {}

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        for i, r in enumerate(requests):
            self.calls += 1
            key, attempt = r.tag["key"], r.tag["attempt"]
            if key in self.error_keys:
                on_result(i, Completion(error="HTTP 503: down"))
                continue
            if key in self.status:
                on_result(i, Completion(error=f"HTTP {self.status[key]}: no", status=self.status[key]))
                continue
            answers = self.script[key]
            on_result(i, Completion(answers[min(attempt, len(answers)) - 1], prompt_tokens=3, completion_tokens=2))

    def close(self) -> None:
        pass


def _validate(item: WorkItem, text: str) -> int:
    value = parse_json(text)
    if not isinstance(value, dict) or "n" not in value:
        raise InvalidAnswer("needs n")
    return value["n"]


def _items(keys: list[str]) -> list[WorkItem]:
    return [WorkItem(k, lambda k=k: ChatRequest(user=["hi"], tag={"key": k})) for k in keys]


def test_bounded_retries_then_a_recorded_failure(tmp_path: Path) -> None:
    backend = Scripted({"good": ['{"n": 1}'], "late": ["nonsense", '{"n": 2}'], "never": ["no", "still no", "nope"]},
                       error_keys=["down"], status={"too_long": 400})
    with Journal(tmp_path / "j.jsonl") as journal:
        stats = run_stage("test", backend, _items(["good", "late", "never", "down", "too_long"]), journal, _validate,
                          attempts=3, progress=False)
    records = {r["key"]: r for r in read_journal(tmp_path / "j.jsonl")}
    assert records["good"]["value"] == 1 and records["late"]["value"] == 2 and records["late"]["attempts"] == 2
    assert records["never"]["ok"] is False and records["never"]["raw"] == "nope" and records["never"]["attempts"] == 3
    assert records["down"]["transport"] is True
    assert records["too_long"]["transport"] is False and records["too_long"]["error"].startswith("HTTP 400")
    assert backend.calls == 1 + 2 + 3 + 1 + 1 and stats["retried_invalid"] == 1 + 2
    # A rerun skips answers, schema failures and final refusals, but asks again what never reached the model.
    assert finished_keys(Journal(tmp_path / "j.jsonl")) == {"good", "late", "never", "too_long"}
    assert finished_keys(Journal(tmp_path / "j.jsonl"), retry_failed=True) == {"good", "late"}
    assert json.loads((tmp_path / "j.jsonl").read_text().splitlines()[0])["key"] == "good"
    # Every answer paid for is on file: the retried ones too, marked as such.
    assert len(read_journal(tmp_path / "j.jsonl")) == backend.calls


def test_a_configuration_refusal_stops_the_stage_at_once(tmp_path: Path) -> None:
    backend = Scripted({"a": ['{"n": 1}']}, status={"b": 401, "c": 401})
    with Journal(tmp_path / "j.jsonl") as journal, pytest.raises(ServerRefused, match="HTTP 401.*--api-key-env"):
        run_stage("test", backend, _items(["a", "b", "c"]), journal, _validate, progress=False)
    assert backend.calls == 2 and [r["key"] for r in read_journal(tmp_path / "j.jsonl")] == ["a"]
