"""The fixed prompts of ProCIR's SFT stage, as plain text files beside this module.

The system turn of the SFT caption-generation dialogue is the construction pipeline's stage-1
prompt (FashionMV paper, appendix D.3 names appendix A.1's prompt for it), kept once, in
``construction/prompts/captions.txt``. The paper elides the third
user turn of the triplet dialogue ("Generate modification text..."); ``modification_request.txt``
completes it. The tiny test tokenizers cover every word of these files
(``backbones.vocabulary``).
"""

from __future__ import annotations

from pathlib import Path

from ....construction.prompts import CAPTION_SYSTEM_PROMPT

FOLDER = Path(__file__).parent


def read_prompt(name: str) -> str:
    return (FOLDER / f"{name}.txt").read_text()


__all__ = ["CAPTION_SYSTEM_PROMPT", "MODIFICATION_REQUEST", "read_prompt"]
MODIFICATION_REQUEST = read_prompt("modification_request")
