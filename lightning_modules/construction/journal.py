"""Append-only JSON-lines journals: every answer is on disk the moment it returns.

Each line is written whole and flushed, so a SIGKILL loses only the requests still in flight; a
torn last line (killed mid-write, or power lost before the sync) is ignored on reading and cut off
before the next append. Lines are synced to disk at most once a second and when the journal closes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from datamodules.jsonl import numbered_json_lines
from datamodules.sidecar import cut_torn_tail


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # unterminated: torn by a kill, even if it parses; the next append cuts it off
    return [record for _, record in numbered_json_lines(path, lines, "; fix or delete the line")]


class Journal:
    def __init__(self, path: str | Path, sync_every_s: float = 1.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_journal(self.path)
        if self.path.is_file():
            cut_torn_tail(self.path)
        self._file = self.path.open("a")
        self._sync_every = sync_every_s
        self._synced = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records.append(record)
        if time.monotonic() - self._synced >= self._sync_every:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
