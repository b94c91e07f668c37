"""Caption sidecars: JSON lines of captions and modified texts that DataModules merge into batches.

One record per line, keyed ``{dataset}--{product_id}`` (product captions) or by the triplet's
sample key (modified texts). Writers append whole records and sync them; a run killed mid-write
leaves at most one torn last line, which readers ignore and the next append cuts off first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .jsonl import numbered_json_lines


def read_sidecar(path: str | Path) -> dict[str, dict[str, Any]]:
    """{key: record}; a torn last line (a run killed mid-write) is ignored, any other bad line is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} not found: create it with `cir caption --out {path} ...`")
    lines = path.read_text().splitlines()
    rows = [rec for _, rec in numbered_json_lines(path, lines[:-1], "; fix or delete the line")]
    if lines and lines[-1].strip():
        try:
            rows.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass  # the torn last line of a killed writer
    return {rec["key"]: rec for rec in rows}


def cut_torn_tail(path: Path) -> None:
    """Drop an unterminated last line, so the next record starts on a line of its own."""
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        end = size
        while end > 0:  # back to the last newline, in blocks
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)


def append_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append ``records`` and sync them to disk before returning."""
    path = Path(path)
    if path.is_file():
        cut_torn_tail(path)
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
