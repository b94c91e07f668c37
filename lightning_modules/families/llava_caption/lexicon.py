"""A fashion attribute lexicon and the caption perturbation behind synthetic negatives.

A synthetic negative is the target caption with attribute words swapped for others of the same
kind ("pastel blue" → "emerald green", "stripes" → "polka dots"): semantically close, wrong.
"""

from __future__ import annotations

import random
import re

LEXICON: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "black", "white", "pink", "purple", "orange", "grey", "brown",
               "teal", "navy", "beige", "cream", "burgundy", "olive", "silver", "gold", "pastel blue",
               "emerald green", "light blue", "dark green"),
    "pattern": ("solid", "plain", "striped", "stripes", "polka dot", "polka dots", "checked", "checks", "plaid",
                "floral", "printed", "print", "animal print", "geometric", "paisley"),
    "material": ("cotton", "denim", "silk", "satin", "leather", "lace", "wool", "linen", "chiffon", "velvet",
                 "knit", "jersey", "sequined"),
    "sleeve": ("sleeveless", "short sleeves", "long sleeves", "three-quarter sleeves", "cap sleeves",
               "puff sleeves"),
    "neckline": ("crew neckline", "v-neck", "square neckline", "turtleneck", "scoop neck", "halter neck",
                 "off-the-shoulder", "boat neck"),
}
# Longest phrases first, so "pastel blue" is one colour and not "blue" inside it.
_TERMS = sorted(((t, k) for k, terms in LEXICON.items() for t in terms), key=lambda tk: -len(tk[0]))
_PATTERN = re.compile(r"\b(" + "|".join(re.escape(t) for t, _ in _TERMS) + r")\b", re.IGNORECASE)
KIND_OF = {t: k for t, k in _TERMS}


def lexicon_matches(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, term, kind) of every lexicon term in ``text``, left to right, non-overlapping."""
    return [(m.start(), m.end(), m.group(0).lower(), KIND_OF[m.group(0).lower()]) for m in _PATTERN.finditer(text)]


def perturb_caption(text: str, rng: random.Random, max_swaps: int = 2) -> str | None:
    """``text`` with 1..``max_swaps`` lexicon terms replaced by other terms of the same kind; None when
    the caption holds no lexicon term (no synthetic negative can be made from it)."""
    matches = lexicon_matches(text)
    if not matches:
        return None
    chosen = sorted(rng.sample(matches, k=min(len(matches), rng.randint(1, max_swaps))))
    out, last = [], 0
    for start, end, term, kind in chosen:
        options = [t for t in LEXICON[kind] if t != term]
        out += [text[last:start], rng.choice(options)]
        last = end
    out.append(text[last:])
    return "".join(out)
