"""The two records every dataset in the framework is converted to.

A **product** is what a gallery holds and what a query starts from: one to five views of the same
item. A **triplet** is a training or evaluation query: source product + modification text → target
product. Real datasets (FashionIQ: one view; FashionMV: several) and the generated one all become
these two records before they are written to shards, so models never see dataset-specific layouts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

MAX_VIEWS = 5
VIEW_NAMES = ("front", "back", "side_left", "side_right", "detail")
# WebDataset splits a member name at its first dot into key and extension: a dot in a key
# would silently corrupt every sample that follows it.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class SchemaError(ValueError):
    """A record that does not satisfy the schema; the message names the record and the field."""


def check_key(key: str, what: str) -> str:
    if not _KEY_RE.match(key):
        raise SchemaError(
            f"{what} {key!r} must contain only letters, digits, '_' and '-' (no dots, slashes or spaces): "
            "WebDataset uses the first dot to split key from extension. Map real ids with safe_key()."
        )
    return key


def safe_key(raw: str) -> str:
    """Turn an arbitrary id (nested paths, dots) into a shard-safe key, reversibly enough to read."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", raw)


def stable_id(text: str) -> int:
    """A process-independent 63-bit integer for a string id (Python's hash() is salted per process);
    metrics carry ids as tensors, and every rank must map an id to the same number."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class Product:
    """One item of a gallery.

    ``views`` and ``view_names`` are parallel; ``view_captions`` holds one caption per view when a
    dataset provides them (empty list otherwise).
    """

    product_id: str
    dataset: str
    category: str
    views: list[Image.Image]
    view_names: list[str]
    short_caption: str = ""
    long_caption: str = ""
    view_captions: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    raw_id: str = ""  # the dataset's own id when it is not shard-safe (nested paths, dots)

    def __post_init__(self) -> None:
        check_key(self.product_id, "product_id")
        check_key(self.dataset, "dataset")
        if not 1 <= len(self.views) <= MAX_VIEWS:
            raise SchemaError(
                f"product {self.product_id!r} has {len(self.views)} views; a product needs 1 to {MAX_VIEWS}"
            )
        if len(self.view_names) != len(self.views):
            raise SchemaError(f"product {self.product_id!r}: view_names and views differ in length")
        if self.view_captions and len(self.view_captions) != len(self.views):
            raise SchemaError(f"product {self.product_id!r}: view_captions and views differ in length")

    def meta(self) -> dict[str, Any]:
        """Everything but the pixels, as written to the shard's ``json`` member."""
        d = asdict(self)
        d.pop("views")
        return d


@dataclass
class Triplet:
    """A query (source product + modification text) and its answer (the target product).

    ``target_id`` is None for query-only test splits (FashionIQ test). ``relative_captions`` keeps a
    dataset's raw captions when the modification text is built from several (FashionIQ: two).

    ``subset_ids``: the products among which CIRR's Recall_subset ranks this query: the target and its
    siblings (products equal to the target except in the changed attributes; in generated data each
    differs from the source in every changed attribute, as the target does), never the source. Empty
    when a dataset has no such groups (FashionIQ, FashionMV); such queries have no Recall_subset.

    ``view_incomplete``: True when the source's first view (``view_names[0]``) cannot show any of the
    changed attributes, old value or new (``synthetic.attributes.change_views``): the change can only be
    seen in the source's other views (FashionMV's view incompleteness). False for datasets that do not
    record it. Shards written before these fields existed lack them: read them with ``.get``.
    """

    source_id: str
    target_id: str | None
    dataset: str
    modification_short: str
    modification_long: str = ""
    views_involved: list[str] = field(default_factory=list)
    changes: dict[str, list[str]] = field(default_factory=dict)  # attribute -> [old, new]
    relative_captions: list[str] = field(default_factory=list)
    subset_ids: list[str] = field(default_factory=list)
    view_incomplete: bool = False

    def __post_init__(self) -> None:
        check_key(self.source_id, "source_id")
        if self.target_id is not None:
            check_key(self.target_id, "target_id")
        check_key(self.dataset, "dataset")
        if self.source_id == self.target_id:
            raise SchemaError(f"triplet {self.source_id}->{self.target_id}: source and target are the same")
        if not self.modification_short.strip():
            raise SchemaError(f"triplet {self.source_id}->{self.target_id}: empty modification_short")
        for pid in self.subset_ids:
            check_key(pid, "subset_ids member")
        # A subset holding the source would let Recall_subset rank the query against itself; one
        # without the target would make the query unanswerable.
        if self.subset_ids and (self.source_id in self.subset_ids or
                                (self.target_id is not None and self.target_id not in self.subset_ids)):
            raise SchemaError(f"triplet {self.source_id}->{self.target_id}: subset_ids must hold the target and not "
                              f"the source, got {self.subset_ids}")

    @property
    def key(self) -> str:
        return f"{self.source_id}--{self.target_id or 'query'}"

    def meta(self) -> dict[str, Any]:
        return asdict(self)
