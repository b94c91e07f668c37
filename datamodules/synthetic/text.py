"""Captions and modification texts of generated products, from attributes through paraphrase templates.

Every literal word lives in the tables below (never inline in code), so ``vocabulary()`` can list
exactly the words the generator can emit; the tiny backbones build their offline tokenizer from it.
"""

from __future__ import annotations

import random
import re

from .attributes import ATTRIBUTE_VALUES, CATEGORIES, visible_views

SHORT_WORDS = (16, 32)
LONG_WORDS = (64, 128)

PATTERN_ADJ = {"solid": "plain", "stripes": "striped", "dots": "polka dot", "checks": "checked",
               "print": "printed"}
PHRASE: dict[str, dict[str, str]] = {
    "pattern": {"solid": "a solid pattern", "stripes": "stripes", "dots": "polka dots", "checks": "checks",
                "print": "a printed pattern"},
    "sleeve": {"sleeveless": "no sleeves", "short": "short sleeves", "long": "long sleeves"},
    "neckline": {"crew": "a crew neckline", "v-neck": "a v-neck", "square": "a square neckline",
                 "turtleneck": "a turtleneck"},
    "back": {"plain": "a plain back", "open back": "an open back",
             "criss-cross straps": "criss-cross straps at the back", "back zipper": "a back zipper",
             "back graphic": "a graphic on the back"},
    "front_detail": {"none": "no front detail", "left pocket": "a pocket on the left",
                     "right pocket": "a pocket on the right", "left logo": "a logo on the left",
                     "right logo": "a logo on the right"},
    "side_detail": {"none": "no side detail", "side slit": "a side slit", "side stripe": "a side stripe",
                    "side zipper": "a side zipper"},
    "hem": {"short": "a short hem", "knee-length": "a knee-length hem", "long": "a long hem"},
}
VIEW_PHRASE = {"front": "from the front", "back": "from the back", "side_left": "from the left side",
               "side_right": "from the right side", "detail": "in the close-up"}
VIEW_TITLE = {"front": "Front view", "back": "Back view", "side_left": "Left side view",
              "side_right": "Right side view", "detail": "Close-up"}

SHORT_CAPTION = [
    "A {colour} {pattern_adj} {category} with {details}.",
    "This {category} is {colour} and {pattern_adj}, with {details}.",
    "{colour_cap} {pattern_adj} {category} featuring {details}.",
]
LONG_OPENING = [
    "This {category} comes in {colour} with {pattern}.",
    "The product is a {colour} {category} made with {pattern}.",
    "Here we have a {pattern_adj} {category} in a {colour} tone.",
]
LONG_VIEW = [
    "Seen {view}, it shows {details}.",
    "Looking at it {view}, you can see {details}.",
    "Viewed {view}, the {category} has {details}.",
]
LONG_FILLER = [
    "The fabric looks smooth and the cut follows a regular fit.",
    "It is photographed on a plain light background without a model.",
    "The overall style is simple and suits everyday wear.",
    "The colour is even across the whole garment and the seams are neat.",
    "It would pair well with neutral shoes and a small bag.",
    "The garment is shown flat and centred in every picture.",
]
SHORT_FILLER = [
    "It is shown on a plain background.",
    "The fit looks regular.",
    "A simple everyday piece.",
]
VIEW_CAPTION = "{title} of a {colour} {pattern_adj} {category}{details}."

CHANGE: dict[str, list[str]] = {
    "colour": ["change the colour from {old} to {new}", "make it {new} instead of {old}",
               "switch the {old} colour to {new}"],
    "pattern": ["replace {old} with {new}", "use {new} instead of {old}", "swap {old} for {new}"],
    "default": ["replace {old} with {new}", "swap {old} for {new}", "change {old} to {new}"],
    "add": ["add {new}", "give it {new}", "include {new}"],
    "remove": ["remove {old}", "take away {old}", "drop {old}"],
    "move": ["move the {kind} to the {side}", "put the {kind} on the {side} instead"],
}
SHORT_MOD = [
    "Please {changes}, and keep everything else about the {category} the same.",
    "I want the same {colour} {category} but {changes}; nothing else should change.",
    "For this {category}, {changes}, while the rest of the design stays exactly as it is.",
]
SHORT_MOD_COMPACT = "{changes}; keep the rest."
SHORT_MOD_FILLER = ["The target is otherwise identical.", "Keep the same cut."]
KEPT_COLOUR = "the {colour} colour"
LONG_MOD_CHANGE = [
    "Looking {view}, {change}.",
    "{view_cap}, {change} so the difference is clear.",
    "This is visible {view}: {change}.",
]
LONG_MOD_OPEN = [
    "I am looking for a {category} very similar to this {colour} one, with a few changes.",
    "Start from this {pattern_adj} {category} and modify only what is described here.",
]
LONG_MOD_KEEP = [
    "Everything else, including {kept}, should stay exactly as it is.",
    "Keep {kept} unchanged.",
]
LONG_MOD_FILLER = [
    "The category and overall shape of the garment must not change.",
    "Do not change anything that is not mentioned in this request.",
    "All other parts of the design should look the same as before.",
    "The target should otherwise look like the reference product in every view.",
    "The fit, the fabric and the proportions should remain as they are now.",
]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def word_count(text: str) -> int:
    return len(text.split())


def _phrase(name: str, value: str, attrs: dict[str, str]) -> str:
    if name == "colour":
        return value
    text = PHRASE[name][value]
    if name == "front_detail" and value != "none":
        text += " chest" if "neckline" in attrs else " hip"
    return text


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fields(attrs: dict[str, str]) -> dict[str, str]:
    return {"colour": attrs["colour"], "colour_cap": attrs["colour"].capitalize(),
            "category": attrs["category"], "pattern": PHRASE["pattern"][attrs["pattern"]],
            "pattern_adj": PATTERN_ADJ[attrs["pattern"]]}


def _pad(text: str, fillers: list[str], lo: int, rng: random.Random) -> str:
    pool = list(fillers)
    rng.shuffle(pool)
    while word_count(text) < lo and pool:
        text += " " + pool.pop()
    return text


def _details(attrs: dict[str, str], names: list[str]) -> list[str]:
    return [_phrase(n, attrs[n], attrs) for n in names if n in attrs and n not in ("colour", "pattern")]


def shown_attributes(attrs: dict[str, str], views: list[str]) -> list[str]:
    """Attributes that at least one of ``views`` shows: a product's captions describe nothing else,
    as FashionMV's captions are written from the product's own images."""
    return [n for n in ATTRIBUTE_VALUES if n in attrs and any(v in visible_views(n, attrs[n]) for v in views)]


def short_caption(attrs: dict[str, str], rng: random.Random, views: list[str]) -> str:
    names = shown_attributes(attrs, views)
    # Absent details are the least informative: drop them first when the caption runs long.
    names.sort(key=lambda n: attrs[n] == "none")
    while True:
        text = rng.choice(SHORT_CAPTION).format(details=_join(_details(attrs, names)), **_fields(attrs))
        if word_count(text) <= SHORT_WORDS[1] or len(names) <= 3:
            break
        names.pop()
    return _pad(text, SHORT_FILLER, SHORT_WORDS[0], rng)


def long_caption(attrs: dict[str, str], rng: random.Random, views: list[str]) -> str:
    """An opening (category, colour, pattern: every view shows them), then what each of the
    product's own views shows, in its view order."""
    fields = _fields(attrs)
    parts = [rng.choice(LONG_OPENING).format(**fields)]
    for view in dict.fromkeys(views):
        names = [n for n in ATTRIBUTE_VALUES if n in attrs and view in visible_views(n, attrs[n])]
        details = _details(attrs, names)
        if details:
            parts.append(rng.choice(LONG_VIEW).format(view=VIEW_PHRASE[view], details=_join(details), **fields))
    return _pad(" ".join(parts), LONG_FILLER, LONG_WORDS[0], rng)


def view_caption(attrs: dict[str, str], view: str) -> str:
    names = [n for n in ATTRIBUTE_VALUES if n in attrs and view in visible_views(n, attrs[n])]
    details = _details(attrs, names)
    return VIEW_CAPTION.format(title=VIEW_TITLE[view], details=(" with " + _join(details)) if details else "",
                               **_fields(attrs))


def _change_clause(name: str, old: str, new: str, attrs: dict[str, str], rng: random.Random) -> str:
    o, n = _phrase(name, old, attrs), _phrase(name, new, attrs)
    if name in ("front_detail", "side_detail") and new == "none":
        return rng.choice(CHANGE["remove"]).format(old=o)
    if name in ("front_detail", "side_detail") and old == "none":
        return rng.choice(CHANGE["add"]).format(new=n)
    if name == "front_detail" and old.split()[1] == new.split()[1]:
        return rng.choice(CHANGE["move"]).format(kind=new.split()[1], side=new.split()[0])
    return rng.choice(CHANGE.get(name, CHANGE["default"])).format(old=o, new=n)


def modification_texts(source: dict[str, str], changes: dict[str, list[str]], views: dict[str, list[str]],
                       rng: random.Random) -> tuple[str, str]:
    """Short and long modification text that turn ``source`` into the target.

    Every changed attribute is named with its new value, so together with the source the text
    pins down the target's full attribute set (unique in its gallery by construction).
    """
    fields = _fields(source)
    clauses = [_change_clause(n, o, v, source, rng) for n, (o, v) in changes.items()]
    templates = rng.sample(SHORT_MOD, len(SHORT_MOD)) + [SHORT_MOD_COMPACT]
    short = next(s for t in templates if word_count(s := t.format(changes=_join(clauses), **fields))
                 <= SHORT_WORDS[1] or t is SHORT_MOD_COMPACT)
    short = _pad(short[0].upper() + short[1:], SHORT_MOD_FILLER, SHORT_WORDS[0], rng)

    parts = [rng.choice(LONG_MOD_OPEN).format(**fields)]
    for clause, name in zip(clauses, changes, strict=True):
        view = VIEW_PHRASE[views[name][0]]
        parts.append(rng.choice(LONG_MOD_CHANGE).format(view=view, view_cap=view.capitalize(), change=clause))
    kept = [KEPT_COLOUR.format(colour=source[n]) if n == "colour" else _phrase(n, source[n], source)
            for n in ATTRIBUTE_VALUES if n in source and n not in changes]
    if kept:
        parts.append(rng.choice(LONG_MOD_KEEP).format(kept=_join(kept[:4])))
    return short, _pad(" ".join(parts), LONG_MOD_FILLER, LONG_WORDS[0], rng)


def relative_captions(source: dict[str, str], changes: dict[str, list[str]], rng: random.Random) -> list[str]:
    """Two FashionIQ-style relative captions: the first change, then the others (or "keep the rest")."""
    clauses = [_change_clause(n, o, v, source, rng) for n, (o, v) in changes.items()]
    return [clauses[0], _join(clauses[1:]) if len(clauses) > 1 else SHORT_MOD_COMPACT.format(changes="").strip("; ")]


def vocabulary() -> list[str]:
    """Every token the generator can write (lower-cased, punctuation split), sorted."""
    texts: list[str] = list(CATEGORIES) + list(PATTERN_ADJ.values())
    texts += [v for table in PHRASE.values() for v in table.values()]
    texts += list(VIEW_PHRASE.values()) + list(VIEW_TITLE.values()) + [VIEW_CAPTION, "chest hip with"]
    texts += [v for values in ATTRIBUTE_VALUES.values() for v in values]
    tables = (SHORT_CAPTION, LONG_OPENING, LONG_VIEW, LONG_FILLER, SHORT_FILLER, SHORT_MOD, SHORT_MOD_FILLER,
              [SHORT_MOD_COMPACT, KEPT_COLOUR], LONG_MOD_CHANGE, LONG_MOD_OPEN, LONG_MOD_KEEP, LONG_MOD_FILLER)
    for table in tables:
        texts += table
    texts += [t for table in CHANGE.values() for t in table]
    words: set[str] = set()
    for t in texts:
        words.update(_words(re.sub(r"\{\w+\}", " ", t)))
    return sorted(words)
