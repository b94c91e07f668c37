"""JSON-lines parsing shared by the converters, the catalogue reader and the build journals: every
non-blank line decoded, a bad one reported as ``file:line`` with the caller's hint for the fix."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def numbered_json_lines(path: Path, lines: Iterable[str], fix: str = "") -> list[tuple[int, Any]]:
    """(1-based line number, decoded value) for every non-blank line of ``lines`` (read from ``path``)."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc}){fix}") from exc
    return out
