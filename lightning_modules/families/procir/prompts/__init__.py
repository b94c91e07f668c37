"""The fixed prompts of ProCIR's SFT stage, as plain text files beside this module.

``caption_system.txt`` is the system turn of the SFT caption-generation dialogue (FashionMV paper,
appendix D.3 names the Stage-1 caption prompt of appendix A.1 for it). The paper elides the third
user turn of the triplet dialogue ("Generate modification text..."); ``modification_request.txt``
completes it. The tiny test tokenizers cover every word of these files
(``backbones.vocabulary``).
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def read_prompt(name: str) -> str:
    return (FOLDER / f"{name}.txt").read_text()


CAPTION_SYSTEM_PROMPT = read_prompt("caption_system")
MODIFICATION_REQUEST = read_prompt("modification_request")
