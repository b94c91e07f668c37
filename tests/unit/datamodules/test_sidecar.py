"""Caption sidecars: a run killed mid-write loses at most the record it was writing."""

from __future__ import annotations

import json
from pathlib import Path

from datamodules.sidecar import append_records, read_sidecar


def test_an_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "captions.jsonl"
    append_records(path, [{"key": "a", "text": "one"}, {"key": "b", "text": "two"}])
    with path.open("a") as f:  # a run killed in the middle of its third record
        f.write('{"key": "c", "text": "thr')
    assert set(read_sidecar(path)) == {"a", "b"}  # the torn line is ignored on reading
    append_records(path, [{"key": "d", "text": "four"}])
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b", "d"]  # every line whole JSON
    assert set(read_sidecar(path)) == {"a", "b", "d"}
    append_records(path, [{"key": "e", "text": "five"}])  # and the file stays readable after
    assert list(read_sidecar(path)) == ["a", "b", "d", "e"]


def test_a_torn_first_line_is_cut_too(tmp_path: Path) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_text('{"key": "x", "te')
    append_records(path, [{"key": "y", "text": "ok"}])
    assert path.read_text() == '{"key": "y", "text": "ok"}\n'
