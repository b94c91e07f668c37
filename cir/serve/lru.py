"""A least-recently-used cache bounded by the bytes its values hold, not by how many there are.

ProCIR's turn-1 caches differ by an order of magnitude in size (one view or five, 256 or 1,024
image tokens each), so a count bound either wastes memory or runs out of it; the service sizes it
in MiB. It takes no lock: the turn-1 cache is used from one thread (the model worker), the session
store (``sessions.py``) holds its own.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

V = TypeVar("V")


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable from ``obj`` (lists, tuples, dicts, dataclasses and plain
    objects' attributes, as transformers' cache classes are), each storage counted once."""
    seen: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif hasattr(item, "__dict__") and not isinstance(item, type | torch.nn.Module):
            stack.extend(vars(item).values())
    return total


class BytesLRU(Generic[V]):
    """At most ``budget_bytes`` of values; the least recently used go first. A value larger than
    the whole budget is not kept (caching it would evict everything for one entry)."""

    def __init__(self, budget_bytes: int, size_of: Callable[[V], int] = tensor_bytes) -> None:
        self.budget = int(budget_bytes)
        self.size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> V | None:
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Keep ``value``; returns False when it alone exceeds the budget (then nothing changes)."""
        size = self.size_of(value)
        if size > self.budget:
            return False
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old
            self.evictions += 1
        return True

    def peek(self, key: Hashable) -> V | None:
        """The value of ``key`` without using it (its place and the counters stay as they are)."""
        found = self._items.get(key)
        return found[0] if found is not None else None

    def pop(self, key: Hashable) -> V | None:
        """Remove ``key`` (an ended session); its value, or None when it was not kept."""
        found = self._items.pop(key, None)
        if found is None:
            return None
        self.bytes -= found[1]
        return found[0]

    def keys(self) -> list[Hashable]:
        """The kept keys, least recently used first."""
        return list(self._items)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._items), "bytes": self.bytes, "budget_bytes": self.budget, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}
