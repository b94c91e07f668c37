"""The procedural multi-view fashion dataset: products, groups of near-duplicates, triplets, splits.

The layout follows CIRR (Liu et al., ICCV 2021), so that neither the images alone nor the text alone
can find the target:

- A **group** is 5-9 products on one base (category and every attribute but the group's 1-3 *axis*
  attributes): two *sources* and 3-7 *candidates*. The sources differ from each other and from every
  candidate in all the axes; candidates differ from one another only there. A triplet runs from a
  source to any other member; its ``subset_ids`` are the group without that source (the target and
  its siblings, k = 4-8 products). All of them sit at the same attribute distance from the source,
  so a ranking that ignores the text can only guess among them (at best 1/k at R@1 once the
  source is removed).
- A **bundle** is 2 groups (``groups_per_bundle``) with the same axes and the same axis values on
  different bases of the same category and colour (2-3 other attributes re-drawn; with 4 groups, a
  second pair of another category). Every requested combination of values is also carried by a
  product of another base that the text's words (category, colour, the changes) match as well, so a
  ranking that reads only the text can only guess among those.
- A share of the triplets (``view_incomplete_share``) changes only what the source's first view cannot
  show (``Triplet.view_incomplete``, FashionMV's view incompleteness): the back design and side
  details of a source seen first from the front (about two thirds of them), or the neckline and chest
  details (pockets, logos) of a source without front or back views, seen first from the side; a back,
  side or close-up view of both products shows the change. The other triplets change at least one
  attribute that the source's first view shows.

A bundle belongs to one split and one sub-dataset, chosen so that every (split, sub-dataset) pair gets
its share of the products; train and val never share a group. Attribute sets are unique over the
whole dataset, so the source plus the changes named in the text identify exactly one product.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from ..schema import VIEW_NAMES, Product, Triplet
from .attributes import (
    ATTRIBUTE_VALUES,
    CATEGORIES,
    CATEGORY_ATTRIBUTES,
    FRONT_HIDDEN,
    UPPER_CATEGORIES,
    VISIBLE_IN,
    attribute_key,
    change_views,
    differences,
    sample_attributes,
)
from .render import render_view
from .text import long_caption, modification_texts, short_caption, view_caption

SPLITS = ("train", "val")
SIDES = ("side_left", "side_right")
# The kind of first view a view-incomplete group's source has, which its changes are hidden from.
Hiding = Literal["front", "side"] | None


@dataclass(frozen=True)
class DatasetStyle:
    """A sub-dataset: its own resolution and view count, so per-dataset evaluation is exercised."""

    size: int
    min_views: int
    max_views: int
    front_prob: float = 0.9


DEFAULT_STYLES: dict[str, DatasetStyle] = {
    "synth_studio": DatasetStyle(size=96, min_views=3, max_views=5),
    "synth_street": DatasetStyle(size=64, min_views=2, max_views=4, front_prob=0.8),
}


@dataclass
class ProductSpec:
    """A product before rendering: attributes, views, and the seed its pixels and texts come from."""

    product_id: str
    dataset: str
    attributes: dict[str, str]
    view_names: list[str]
    seed: int

    def render(self, size: int) -> Product:
        rng = random.Random(self.seed)
        views = [render_view(self.attributes, v, size, rng) for v in self.view_names]
        return Product(
            product_id=self.product_id,
            dataset=self.dataset,
            category=self.attributes["category"],
            views=views,
            view_names=list(self.view_names),
            short_caption=short_caption(self.attributes, rng, self.view_names),
            long_caption=long_caption(self.attributes, rng, self.view_names),
            view_captions=[view_caption(self.attributes, v) for v in self.view_names],
            attributes={k: v for k, v in self.attributes.items() if k != "category"},
        )


@dataclass(frozen=True)
class Group:
    """Two sources and their candidates; ``bundle`` numbers the groups that share axes and values."""

    sources: tuple[str, str]
    candidates: tuple[str, ...]
    axes: tuple[str, ...]
    bundle: int
    view_incomplete: bool

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.sources, *self.candidates)


@dataclass
class SyntheticData:
    products: dict[str, ProductSpec]
    split_of: dict[str, str]
    triplets: dict[str, list[Triplet]] = field(default_factory=dict)
    styles: dict[str, DatasetStyle] = field(default_factory=lambda: dict(DEFAULT_STYLES))
    # Products of no group (the few left over when the product count does not divide into bundles)
    # are gallery distractors only.
    groups: list[Group] = field(default_factory=list)

    def split_products(self, split: str) -> list[ProductSpec]:
        return [p for pid, p in self.products.items() if self.split_of[pid] == split]

    def render(self, split: str) -> Iterator[Product]:
        for spec in self.split_products(split):
            yield spec.render(self.styles[spec.dataset].size)


def _sample_views(rng: random.Random, style: DatasetStyle, required: set[str] | frozenset[str] = frozenset(),
                  front: bool = False, exclude: frozenset[str] = frozenset()) -> list[str]:
    """The style's random view set plus ``required`` (and the front when ``front``), none of ``exclude``;
    drawn views beyond the style's maximum are dropped again, never a required one."""
    n = rng.randint(style.min_views, style.max_views)
    others = [v for v in VIEW_NAMES if v != "front" and v not in exclude]
    if front or ("front" not in exclude and rng.random() < style.front_prob):
        chosen = {"front", *rng.sample(others, min(n - 1, len(others)))}
    else:
        chosen = set(rng.sample(others, min(n, len(others))))
    keep = set(required) | ({"front"} if front else set())
    chosen |= keep
    extra = [v for v in VIEW_NAMES if v in chosen and v not in keep]
    rng.shuffle(extra)
    while len(chosen) > max(style.max_views, len(keep)) and extra:
        chosen.discard(extra.pop())
    return [v for v in VIEW_NAMES if v in chosen]


def triplet_between(a: ProductSpec, b: ProductSpec, rng: random.Random) -> Triplet | None:
    """The triplet a → b, or None when they differ in more than 3 attributes (or none), or a change
    cannot be seen in a view both products have. ``view_incomplete`` is set as ``Triplet`` defines it."""
    changes = differences(a.attributes, b.attributes)
    if not 1 <= len(changes) <= 3:
        return None
    views: dict[str, list[str]] = {}
    for name, (old, new) in changes.items():
        common = [v for v in change_views(name, old, new) if v in a.view_names and v in b.view_names]
        if not common:  # the change could not be seen in both products: not a fair query
            return None
        views[name] = common
    short, long = modification_texts(a.attributes, changes, views, rng)
    involved = {v for vs in views.values() for v in vs}
    first = a.view_names[0]
    return Triplet(
        source_id=a.product_id, target_id=b.product_id, dataset=a.dataset,
        modification_short=short, modification_long=long,
        views_involved=[v for v in VIEW_NAMES if v in involved], changes=changes,
        view_incomplete=not any(first in change_views(name, old, new) for name, (old, new) in changes.items()),
    )


def _ordered(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in ATTRIBUTE_VALUES if n in names)


def _draw_axes(rng: random.Random, category: str, hiding: Hiding) -> tuple[str, ...]:
    """1-3 axis attributes. View-incomplete groups change only what their source's first view cannot
    show: the back design and side details for a front view; the neckline and chest details (seen in
    the close-up) for a side view. Other groups change at least one attribute the front shows."""
    if hiding == "front":
        return ("back",) if rng.random() < 0.3 else FRONT_HIDDEN
    if hiding == "side":
        return ("neckline", "front_detail") if "neckline" in CATEGORY_ATTRIBUTES[category] and rng.random() < 0.5 \
            else ("front_detail",)
    names = CATEGORY_ATTRIBUTES[category]
    while True:
        axes = rng.sample(names, rng.choices((1, 2, 3), weights=(0.3, 0.4, 0.3))[0])
        if any(a not in FRONT_HIDDEN for a in axes):
            return _ordered(axes)


def _capacity(axes: tuple[str, ...]) -> int:
    """The largest subset a group on ``axes`` can give a query: the other source, and every value
    combination that differs from both sources' in every axis."""
    return 1 + math.prod(len(ATTRIBUTE_VALUES[a]) - 2 for a in axes)


def _twin_bases(rng: random.Random, base: dict[str, str], axes: tuple[str, ...], n: int) -> list[dict[str, str]]:
    """``base`` and ``n - 1`` other bases that can carry the same axis values, in pairs: a base of a new
    category (``base`` first), then a twin of the same category and colour with 2-3 other attributes
    re-drawn, so a text that names the source's category and colour still matches two bases."""
    out: list[dict[str, str]] = []
    categories = [c for c in CATEGORIES if c != base["category"] and set(axes) <= set(CATEGORY_ATTRIBUTES[c])]
    rng.shuffle(categories)
    for i in range(n):
        if i % 2 == 1:
            first = out[-1]
            free = [a for a in CATEGORY_ATTRIBUTES[first["category"]] if a not in axes and a != "colour"]
            twin = dict(first)
            for a in rng.sample(free, min(len(free), rng.randint(2, 3))):
                twin[a] = rng.choice([v for v in ATTRIBUTE_VALUES[a] if v != first[a]])
            out.append(twin)
        else:
            out.append(base if i == 0 else sample_attributes(rng, categories[(i // 2 - 1) % len(categories)]))
    return out


Projection = tuple[tuple[str, str], ...]


def _project(attrs: dict[str, str], axes: tuple[str, ...]) -> Projection:
    return tuple((k, v) for k, v in sorted(attrs.items()) if k not in axes)


class _Occupancy:
    """The attribute sets drawn so far, per split, sub-dataset and category, so that a query's siblings
    are exactly the rest of its group: a new group is refused when an earlier product equals its base
    outside its axes, or when one of its products equals an earlier group's base outside that group's
    axes (either would be a sibling outside the group). Attribute sets stay unique overall."""

    def __init__(self) -> None:
        self.seen: set[Projection] = set()
        self.products: dict[tuple[str, ...], list[dict[str, str]]] = {}
        self.projections: dict[tuple[str, ...], dict[tuple[str, ...], set[Projection]]] = {}
        self.bases: dict[tuple[str, ...], dict[tuple[str, ...], set[Projection]]] = {}

    def _projected(self, cell: tuple[str, ...], axes: tuple[str, ...]) -> set[Projection]:
        by_axes = self.projections.setdefault(cell, {})
        if axes not in by_axes:  # built on first use, then kept up to date by ``add``
            by_axes[axes] = {_project(a, axes) for a in self.products.get(cell, [])}
        return by_axes[axes]

    def free(self, where: tuple[str, str], groups: list[list[dict[str, str]]], axes: tuple[str, ...] = ()) -> bool:
        keys = [attribute_key(m) for g in groups for m in g]
        if len(set(keys)) != len(keys) or not self.seen.isdisjoint(keys):
            return False
        for members in groups:
            cell = (*where, members[0]["category"])
            if axes and _project(members[0], axes) in self._projected(cell, axes):
                return False
            earlier = self.bases.get(cell, {})
            if any(_project(m, a) in bases for m in members for a, bases in earlier.items()):
                return False
        return True

    def add(self, where: tuple[str, str], attrs: dict[str, str], axes: tuple[str, ...] = ()) -> None:
        cell = (*where, attrs["category"])
        self.seen.add(attribute_key(attrs))
        self.products.setdefault(cell, []).append(attrs)
        for a, projections in self.projections.get(cell, {}).items():
            projections.add(_project(attrs, a))
        if axes:
            self.bases.setdefault(cell, {}).setdefault(axes, set()).add(_project(attrs, axes))


def _draw_bundle(rng: random.Random, sizes: tuple[int, int], n_groups: int, room: int, hiding: Hiding,
                 where: tuple[str, str], drawn: _Occupancy) -> tuple[tuple[str, ...], list[list[dict[str, str]]]]:
    """Axes and, per group, the attribute sets of its two sources and its candidates (subsets of
    ``sizes`` products, as large as the axes allow and ``room`` products hold), free in ``drawn``."""
    for _ in range(200):
        category = rng.choice(UPPER_CATEGORIES if hiding == "front" else CATEGORIES)
        axes = _draw_axes(rng, category, hiding)
        most = min(sizes[1], _capacity(axes), room // n_groups - 1)
        if most < sizes[0]:
            continue
        k = rng.randint(sizes[0], most)
        first = {a: rng.choice(ATTRIBUTE_VALUES[a]) for a in axes}
        second = {a: rng.choice([v for v in ATTRIBUTE_VALUES[a] if v != first[a]]) for a in axes}
        combos = list(itertools.product(*[[v for v in ATTRIBUTE_VALUES[a] if v not in (first[a], second[a])]
                                          for a in axes]))
        values = [first, second] + [dict(zip(axes, c, strict=True)) for c in rng.sample(combos, k - 1)]
        groups = [[{**base, **v} for v in values]
                  for base in _twin_bases(rng, sample_attributes(rng, category), axes, n_groups)]
        if drawn.free(where, groups, axes):
            for members in groups:
                for m in members:
                    drawn.add(where, m, axes)
            return axes, groups
    raise RuntimeError("could not draw a bundle without a product like an earlier one in 200 tries: too many "
                       "products for the attribute space")


def _anchors(rng: random.Random, axes: tuple[str, ...], hiding: Hiding) -> set[str]:
    """One view per axis that every member of a group has, so each change is seen in a view both the
    source and the target have. Visible axes often share one (the front shows most of them), which
    keeps the forced views within a street style's four."""
    out: set[str] = set()
    for a in axes:
        if hiding == "front":
            out.add("back" if a == "back" else rng.choice(SIDES))
            continue
        if hiding == "side":
            out.add("detail")
            continue
        shared = [v for v in VISIBLE_IN[a] if v in out]
        out.add(rng.choice(shared) if shared and rng.random() < 0.6 else rng.choice(VISIBLE_IN[a]))
    return out


def _source_views(rng: random.Random, style: DatasetStyle, anchors: set[str], axes: tuple[str, ...],
                  hiding: Hiding) -> list[str]:
    """A source's views: its first view (the first in ``VIEW_NAMES`` order) hides every axis in a
    view-incomplete group and shows at least one otherwise."""
    if hiding == "front":
        return _sample_views(rng, style, anchors, front=True)
    if hiding == "side":  # no front or back: a side view comes first
        return _sample_views(rng, style, anchors | {rng.choice(SIDES)}, exclude=frozenset({"front", "back"}))
    views = _sample_views(rng, style, anchors)
    if not any(views[0] in VISIBLE_IN[a] for a in axes):
        # A first view showing none of the axes would make the query view-incomplete by chance; the
        # front shows every attribute a visible group changes.
        views = _sample_views(rng, style, anchors, front=True)
    return views


def _plan_groups(remaining: int, sizes: tuple[int, int], most: int) -> int:
    """Groups in the next bundle: ``most``, fewer when ``remaining`` products cannot hold them (0: none
    fit); an even number when possible, so every base has its same-category twin."""
    fitting = [n for n in range(most, 1, -1) if remaining // n - 1 >= sizes[0]]
    return next((n for n in fitting if n % 2 == 0), fitting[0] if fitting else 0)


def generate(products: int, seed: int = 0, val_fraction: float = 0.2, styles: dict[str, DatasetStyle] | None = None,
             view_incomplete_share: float = 0.3, group_sizes: tuple[int, int] = (4, 8),
             groups_per_bundle: int = 2) -> SyntheticData:
    """Draw ``products`` products in bundles of groups, and their triplets; deterministic in ``seed``.

    ``view_incomplete_share``: the share of each split's triplets whose change the source's first view
    cannot show (met to within one bundle). ``group_sizes``: the range of a query's ``subset_ids``
    size (a group's size less one). ``groups_per_bundle``: groups that share axes and values (2 or
    more; pairs of the same category and colour, each pair of its own category): more text twins per
    query, fewer distinct changes per split.
    """
    if products < 10:
        raise ValueError(f"products={products}: the generator needs at least 10 products to form both splits")
    if not 0.0 <= view_incomplete_share <= 1.0:
        raise ValueError(f"view_incomplete_share={view_incomplete_share}: must be between 0 and 1")
    if not 2 <= group_sizes[0] <= min(group_sizes[1], 7) or group_sizes[1] > 12:
        raise ValueError(f"group_sizes={group_sizes}: need 2 <= low <= 7 (the largest view-incomplete subset), "
                         "low <= high <= 12")
    if groups_per_bundle < 2:
        raise ValueError(f"groups_per_bundle={groups_per_bundle}: 2 or more, or no query has a text twin")
    styles = styles or dict(DEFAULT_STYLES)
    rng = random.Random(seed)
    cells = [(split, name) for split in SPLITS for name in sorted(styles)]
    share = {cell: (val_fraction if cell[0] == "val" else 1 - val_fraction) / len(styles) for cell in cells}
    placed = dict.fromkeys(cells, 0)
    hidden_tally = {split: [0, 0] for split in SPLITS}  # view-incomplete triplets, all triplets
    specs: dict[str, ProductSpec] = {}
    split_of: dict[str, str] = {}
    groups: list[Group] = []
    triplets: dict[str, list[Triplet]] = {split: [] for split in SPLITS}
    drawn = _Occupancy()

    def missing(cell: tuple[str, str]) -> float:
        return share[cell] * products - placed[cell]

    def cell_for() -> tuple[str, str]:
        # The pair furthest below its share of all the products. A split with a share but no product
        # yet goes first, and an empty pair, then val, wins a tie, so that small datasets still get a
        # val split, and every sub-dataset into both splits where they can.
        empty_splits = {c[0] for c in cells if share[c] > 0} - {c[0] for c in cells if placed[c]}
        return max(cells, key=lambda c: (c[0] in empty_splits and share[c] > 0, round(missing(c), 6),
                                         placed[c] == 0, c[0] == "val"))

    def add(attrs: dict[str, str], dataset: str, split: str, views: list[str]) -> ProductSpec:
        pid = f"p{len(specs):06d}"
        specs[pid] = ProductSpec(pid, dataset, attrs, views, rng.getrandbits(32))
        split_of[pid] = split
        placed[(split, dataset)] += 1
        return specs[pid]

    bundle = 0
    mean_k = sum(group_sizes) / 2
    while n_groups := _plan_groups(products - len(specs), group_sizes, groups_per_bundle):
        split, dataset = cell_for()
        # No bigger than what the pair still misses (the smallest bundle if it misses less), so small
        # datasets keep their shares too.
        room = min(products - len(specs), max(math.floor(missing((split, dataset))), n_groups * (group_sizes[0] + 1)))
        style = styles[dataset]
        done, total = hidden_tally[split]
        expected = n_groups * 2 * mean_k
        hidden = view_incomplete_share > 0 and done + expected / 2 <= view_incomplete_share * (total + expected)
        hiding: Hiding = rng.choices(("front", "side"), weights=(0.65, 0.35))[0] if hidden else None
        axes, members = _draw_bundle(rng, group_sizes, n_groups, room, hiding, (split, dataset), drawn)
        for attrs in members:
            anchors = _anchors(rng, axes, hiding)
            sources = [add(a, dataset, split, _source_views(rng, style, anchors, axes, hiding)) for a in attrs[:2]]
            candidates = [add(a, dataset, split, _sample_views(rng, style, anchors)) for a in attrs[2:]]
            group = Group((sources[0].product_id, sources[1].product_id), tuple(c.product_id for c in candidates),
                          axes, bundle, hidden)
            groups.append(group)
            for source in sources:
                for target in sources + candidates:
                    if target is source:
                        continue
                    t = triplet_between(source, target, rng)
                    if t is None or t.view_incomplete != hidden:
                        raise AssertionError(f"generator bug: {source.product_id}->{target.product_id} is not a fair "
                                             f"{'view-incomplete ' if hidden else ''}query")
                    triplets[split].append(t)
        n_triplets = sum(2 * (len(g) - 1) for g in members)
        hidden_tally[split] = [done + n_triplets * hidden, total + n_triplets]
        bundle += 1

    for _ in range(products - len(specs)):  # fewer than two minimal groups left: gallery distractors
        split, dataset = cell_for()
        for _ in range(200):
            attrs = sample_attributes(rng)
            if drawn.free((split, dataset), [[attrs]]):
                break
        else:
            raise RuntimeError("could not draw a distractor unlike every earlier product in 200 tries")
        drawn.add((split, dataset), attrs)
        add(attrs, dataset, split, _sample_views(rng, styles[dataset]))
    subset_of = {source: [m for m in g.members if m != source] for g in groups for source in g.sources}
    triplets = {split: [replace(t, subset_ids=subset_of[t.source_id]) for t in ts] for split, ts in triplets.items()}
    return SyntheticData(specs, split_of, triplets, styles, groups)
