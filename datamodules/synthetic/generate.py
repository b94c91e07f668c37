"""The procedural multi-view fashion dataset: products, triplets, splits.

Products come in *families*: a base attribute set and a few variants, each 1-3 attributes away.
Triplets are ordered pairs inside a family, so every split holds its own queries and targets, and
a family never straddles train and val (product-level split, zero overlap). Attribute sets are
unique over the whole dataset, so "source + the changes named in the text" identifies exactly one
gallery product.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..schema import VIEW_NAMES, Product, Triplet
from .attributes import attribute_key, change_views, differences, mutate, sample_attributes
from .render import render_view
from .text import long_caption, modification_texts, short_caption, view_caption


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


@dataclass
class SyntheticData:
    products: dict[str, ProductSpec]
    split_of: dict[str, str]
    triplets: dict[str, list[Triplet]] = field(default_factory=dict)
    styles: dict[str, DatasetStyle] = field(default_factory=lambda: dict(DEFAULT_STYLES))

    def split_products(self, split: str) -> list[ProductSpec]:
        return [p for pid, p in self.products.items() if self.split_of[pid] == split]

    def render(self, split: str) -> Iterator[Product]:
        for spec in self.split_products(split):
            yield spec.render(self.styles[spec.dataset].size)


def _sample_views(rng: random.Random, style: DatasetStyle) -> list[str]:
    n = rng.randint(style.min_views, style.max_views)
    others = [v for v in VIEW_NAMES if v != "front"]
    if rng.random() < style.front_prob:
        chosen = {"front", *rng.sample(others, n - 1)}
    else:
        chosen = set(rng.sample(others, min(n, len(others))))
    return [v for v in VIEW_NAMES if v in chosen]


def triplet_between(a: ProductSpec, b: ProductSpec, rng: random.Random) -> Triplet | None:
    """The triplet a → b, or None when they differ in more than 3 attributes (or none), or a change
    cannot be seen in a view both products have."""
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
    return Triplet(
        source_id=a.product_id, target_id=b.product_id, dataset=a.dataset,
        modification_short=short, modification_long=long,
        views_involved=[v for v in VIEW_NAMES if v in involved], changes=changes,
    )


def generate(products: int, seed: int = 0, val_fraction: float = 0.2, max_triplets_per_family: int = 8,
             styles: dict[str, DatasetStyle] | None = None) -> SyntheticData:
    """Draw ``products`` products in families and their triplets; deterministic in ``seed``."""
    if products < 10:
        raise ValueError(f"products={products}: the generator needs at least 10 products to form both splits")
    styles = styles or dict(DEFAULT_STYLES)
    rng = random.Random(seed)
    specs: dict[str, ProductSpec] = {}
    split_of: dict[str, str] = {}
    families: list[list[ProductSpec]] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    val_every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    while len(specs) < products:
        split = "val" if val_every and len(families) % val_every == val_every - 1 else "train"
        # Datasets alternate per block of val_every families, so both splits get every dataset.
        dataset = sorted(styles)[(len(families) // max(1, val_every)) % len(styles)]
        base = sample_attributes(rng)
        members = [base] + [mutate(base, rng, rng.randint(1, 3)) for _ in range(rng.randint(2, 4))]
        family: list[ProductSpec] = []
        for attrs in members:
            key = attribute_key(attrs)
            if key in seen or len(specs) >= products:
                continue
            seen.add(key)
            pid = f"p{len(specs):06d}"
            spec = ProductSpec(pid, dataset, attrs, _sample_views(rng, styles[dataset]), rng.getrandbits(32))
            specs[pid] = spec
            split_of[pid] = split
            family.append(spec)
        families.append(family)

    triplets: dict[str, list[Triplet]] = {"train": [], "val": []}
    for family in families:
        candidates = [t for a in family for b in family if a is not b and (t := triplet_between(a, b, rng))]
        rng.shuffle(candidates)
        if candidates:
            triplets[split_of[family[0].product_id]].extend(candidates[:max_triplets_per_family])
    return SyntheticData(specs, split_of, triplets, styles)
