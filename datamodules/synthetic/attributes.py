"""The attribute space of the generated fashion products, and which view shows what.

The generator draws products from these attributes, so every caption and modification text is
grounded in pixels: an attribute only ever appears in a caption of a view that shows it.
"""

from __future__ import annotations

import random

CATEGORIES: tuple[str, ...] = ("dress", "shirt", "top", "skirt", "pants")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 45),
    "blue": (40, 80, 210),
    "green": (40, 160, 70),
    "yellow": (235, 205, 40),
    "black": (25, 25, 28),
    "white": (245, 245, 240),
    "pink": (240, 130, 180),
    "purple": (120, 50, 160),
    "orange": (240, 130, 30),
    "grey": (128, 128, 132),
    "brown": (120, 75, 40),
    "teal": (20, 140, 140),
}
PATTERNS = ("solid", "stripes", "dots", "checks", "print")
SLEEVES = ("sleeveless", "short", "long")
NECKLINES = ("crew", "v-neck", "square", "turtleneck")
BACK_DESIGNS = ("plain", "open back", "criss-cross straps", "back zipper", "back graphic")
# Front details sit on the wearer's left or right: seen from the front that side is on the
# image's right, seen from the back it is on the image's left (see render.wearer_x).
FRONT_DETAILS = ("none", "left pocket", "right pocket", "left logo", "right logo")
SIDE_DETAILS = ("none", "side slit", "side stripe", "side zipper")
HEMS = ("short", "knee-length", "long")

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "sleeve": SLEEVES,
    "neckline": NECKLINES,
    "back": BACK_DESIGNS,
    "front_detail": FRONT_DETAILS,
    "side_detail": SIDE_DETAILS,
    "hem": HEMS,
}

UPPER = ("colour", "pattern", "sleeve", "neckline", "back", "front_detail", "side_detail", "hem")
CATEGORY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "dress": UPPER,
    "shirt": UPPER,
    "top": UPPER,
    "skirt": ("colour", "pattern", "front_detail", "side_detail", "hem"),
    "pants": ("colour", "pattern", "front_detail", "side_detail", "hem"),
}

# Which views show an attribute. The detail view is a zoomed crop of the front torso.
VISIBLE_IN: dict[str, tuple[str, ...]] = {
    "colour": ("front", "back", "side_left", "side_right", "detail"),
    "pattern": ("front", "back", "side_left", "side_right", "detail"),
    "sleeve": ("front", "back", "side_left", "side_right"),
    "neckline": ("front", "detail"),
    "back": ("back",),
    "front_detail": ("front", "detail"),
    "side_detail": ("side_left", "side_right"),
    "hem": ("front", "back", "side_left", "side_right"),
}
# Attributes the front view never shows: changing only these is a view-incomplete query for a
# source whose first view is the front.
FRONT_HIDDEN: tuple[str, ...] = tuple(a for a, views in VISIBLE_IN.items() if "front" not in views)
UPPER_CATEGORIES: tuple[str, ...] = tuple(c for c in CATEGORIES if set(FRONT_HIDDEN) <= set(CATEGORY_ATTRIBUTES[c]))
# A logo is printed on the chest and repeated as a small tag on the back shoulder of the same
# side of the wearer, so it is the one front detail also visible from the back.
LOGO_VISIBLE_IN = ("front", "back", "detail")


def visible_views(attribute: str, value: str) -> tuple[str, ...]:
    if attribute == "front_detail" and value.endswith("logo"):
        return LOGO_VISIBLE_IN
    return VISIBLE_IN[attribute]


def change_views(attribute: str, old: str, new: str) -> tuple[str, ...]:
    """Views in which a change of ``attribute`` from ``old`` to ``new`` can be seen."""
    seen = set(visible_views(attribute, old)) | set(visible_views(attribute, new))
    return tuple(v for v in VISIBLE_IN["colour"] if v in seen)


def sample_attributes(rng: random.Random, category: str | None = None) -> dict[str, str]:
    category = category or rng.choice(CATEGORIES)
    attrs = {"category": category}
    for name in CATEGORY_ATTRIBUTES[category]:
        attrs[name] = rng.choice(ATTRIBUTE_VALUES[name])
    return attrs


def mutate(attrs: dict[str, str], rng: random.Random, n_changes: int) -> dict[str, str]:
    """A copy of ``attrs`` with ``n_changes`` attributes set to other values (category kept)."""
    names = list(CATEGORY_ATTRIBUTES[attrs["category"]])
    changed = rng.sample(names, k=min(n_changes, len(names)))
    out = dict(attrs)
    for name in changed:
        out[name] = rng.choice([v for v in ATTRIBUTE_VALUES[name] if v != attrs[name]])
    return out


def attribute_key(attrs: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(attrs.items()))


def differences(a: dict[str, str], b: dict[str, str]) -> dict[str, list[str]]:
    return {k: [a[k], b[k]] for k in a if k != "category" and a[k] != b[k]}
