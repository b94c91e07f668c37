"""The two prompts of the LLaVA-caption paper (section 3.2), as plain text files beside this module:
``describe.txt`` captions a product image (C_r, C_t); ``rewrite.txt`` turns C_r and the relative
caption into a modified description."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def read_prompt(name: str) -> str:
    return (FOLDER / f"{name}.txt").read_text()


DESCRIBE_PROMPT = read_prompt("describe")
REWRITE_PROMPT = read_prompt("rewrite")


def rewrite_input(reference_caption: str, relative_caption: str) -> str:
    """C_r ⊕ the dataset's relative caption, the input of the modified-text synthesis."""
    return f"Original description: {reference_caption}\nChange: {relative_caption}"
