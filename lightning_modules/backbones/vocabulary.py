"""The closed vocabularies of the tiny random backbones (tests, demos).

A tiny model's word-level tokenizer must cover every text it will see: the generator's words and
the words of the fixed prompts it is trained or prompted with. The prompts are plain text files
kept by the families that own them (``families/<family>/prompts/*.txt``, and the dataset
pipeline's ``construction/prompts/*.txt``); they are read here as
files, never imported, so this layer keeps pointing down.
"""

from __future__ import annotations

import re
from pathlib import Path

from datamodules.synthetic.text import vocabulary as generated_vocabulary

FAMILIES = Path(__file__).resolve().parents[1] / "families"
CONSTRUCTION_PROMPTS = Path(__file__).resolve().parents[1] / "construction" / "prompts"
# The chat roles and the JSON fields of ProCIR's SFT answers.
CHAT_WORDS = ("user assistant system image view long_caption short_caption views_involved modification_text_long "
              "modification_text_short front back side detail true false 1 2 3 4 5")


def prompt_text(family: str) -> str:
    """Every prompt file of ``family``, joined."""
    return " ".join(p.read_text() for p in sorted((FAMILIES / family / "prompts").glob("*.txt")))


def construction_prompt_text() -> str:
    """The dataset pipeline's stage prompts (ProCIR's SFT reuses the caption prompt)."""
    return " ".join(p.read_text() for p in sorted(CONSTRUCTION_PROMPTS.glob("*.txt")))


def qwen_words() -> set[str]:
    """The tiny Qwen3.5's words: generated text, ProCIR's and the dataset pipeline's prompts, the chat
    roles and answer fields."""
    text = f"{prompt_text('procir')} {construction_prompt_text()} {CHAT_WORDS}"
    # Whole words, and their parts around "_": the tokenizer splits JSON field names at punctuation.
    words = re.findall(r"\w+", text) + re.findall(r"[A-Za-z0-9]+", text)
    return set(generated_vocabulary()) | {w.lower() for w in words}


def llava_words() -> set[str]:
    """The tiny LLaVA's words: generated text, LLaVA-caption's prompts and the rewrite input's labels."""
    words = set(generated_vocabulary()) | {"user", "assistant", "original", "description", "change", ":"}
    return words | {w.strip(".,").lower() for w in prompt_text("llava_caption").split()}


def clip_words() -> set[str]:
    return set(generated_vocabulary())
