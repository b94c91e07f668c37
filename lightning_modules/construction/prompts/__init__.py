"""The construction stages' system prompts: the project's files, or a user's folder of replacements.

The shipped files are written in the project's own words and carry the instructions of the
FashionMV paper's appendix A as facts (fields and their order, word ranges, the left/right rules,
the selection criteria). ``--prompts DIR`` swaps in ``DIR/captions.txt``, ``DIR/verify.txt`` and
``DIR/triplets.txt`` where present, e.g. a copy of the appendix text for a verbatim reproduction.
The stage-1 prompt is also the system turn of ProCIR's SFT caption dialogues.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Stage = Literal["captions", "verify", "triplets"]
STAGES: tuple[Stage, ...] = ("captions", "verify", "triplets")
# Appendix A samples every stage at temperature 1.0 with these answer budgets (--max-tokens' default).
PAPER_MAX_TOKENS: dict[Stage, int] = {"captions": 8192, "verify": 16384, "triplets": 4096}
FOLDER = Path(__file__).parent


@dataclass(frozen=True)
class Prompt:
    stage: Stage
    text: str
    source: str  # the file it came from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def default_prompt(stage: Stage) -> str:
    return (FOLDER / f"{stage}.txt").read_text()


def load_prompts(folder: str | Path | None = None) -> dict[Stage, Prompt]:
    """The three prompts; files in ``folder`` replace the defaults, anything else there is an error."""
    override = Path(folder) if folder is not None else None
    if override is not None:
        if not override.is_dir():
            raise FileNotFoundError(f"--prompts {override}: not a folder (it should hold captions.txt, verify.txt "
                                    "and/or triplets.txt)")
        unknown = sorted(p.name for p in override.glob("*.txt") if p.stem not in STAGES)
        if unknown:
            raise ValueError(f"--prompts {override}: unknown prompt files {unknown}; the stages are "
                             f"{[f'{s}.txt' for s in STAGES]}")
    out: dict[Stage, Prompt] = {}
    for stage in STAGES:
        path = override / f"{stage}.txt" if override is not None else None
        if path is None or not path.is_file():
            path = FOLDER / f"{stage}.txt"
        text = path.read_text()
        if not text.strip():
            raise ValueError(f"prompt file {path} is empty")
        out[stage] = Prompt(stage, text, str(path))
    return out


CAPTION_SYSTEM_PROMPT = default_prompt("captions")
