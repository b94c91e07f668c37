from __future__ import annotations

from dataclasses import dataclass

import torch

from cir.serve.lru import BytesLRU, tensor_bytes


@dataclass
class Held:
    layers: list[torch.Tensor]
    extra: dict[str, torch.Tensor]


class CacheLike:
    """Shaped like transformers' cache classes: tensors behind plain attributes."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.key_cache = list(tensors)
        self.conv_states = {0: tensors[0]}  # the same tensor twice: counted once


def test_tensor_bytes_counts_every_reachable_storage_once() -> None:
    a, b = torch.zeros(10, dtype=torch.float32), torch.zeros(3, 4, dtype=torch.float16)
    view = a[2:5]  # shares a's storage
    assert tensor_bytes(Held([a, b, view], {"c": torch.zeros(2, dtype=torch.int64)})) == 40 + 24 + 16
    assert tensor_bytes(CacheLike(a, b)) == 40 + 24
    assert tensor_bytes("no tensors") == 0


def test_least_recently_used_goes_first_when_the_bytes_exceed_the_budget() -> None:
    lru: BytesLRU[torch.Tensor] = BytesLRU(budget_bytes=100)
    for key in "abc":
        assert lru.put(key, torch.zeros(8))  # 32 bytes each: 96 in all
    assert lru.bytes == 96 and len(lru) == 3
    assert lru.get("a") is not None  # a is now the most recent: b is the oldest
    lru.put("d", torch.zeros(4))  # 16 bytes: 112 > 100, so b goes
    assert "b" not in lru and {"a", "c", "d"} == {k for k in "abcd" if k in lru} and lru.bytes == 80
    lru.put("e", torch.zeros(20))  # 80 bytes; use order c, a, d, e: c then a go, leaving 16 + 80
    assert [k for k in "abcde" if k in lru] == ["d", "e"] and lru.bytes == 96 and lru.evictions == 3


def test_eviction_order_is_by_last_use() -> None:
    lru: BytesLRU[torch.Tensor] = BytesLRU(budget_bytes=64)
    lru.put("x", torch.zeros(8))
    lru.put("y", torch.zeros(8))
    lru.get("x")
    lru.put("z", torch.zeros(8))  # y is the least recently used
    assert "x" in lru and "z" in lru and "y" not in lru
    assert lru.stats() == {"entries": 2, "bytes": 64, "budget_bytes": 64, "hits": 1, "misses": 0, "evictions": 1}


def test_a_value_larger_than_the_budget_is_not_kept_and_evicts_nothing() -> None:
    lru: BytesLRU[torch.Tensor] = BytesLRU(budget_bytes=50)
    lru.put("small", torch.zeros(4))
    assert not lru.put("huge", torch.zeros(100))
    assert "small" in lru and "huge" not in lru and lru.bytes == 16
    assert lru.get("huge") is None and lru.misses == 1


def test_replacing_a_key_updates_its_size() -> None:
    lru: BytesLRU[torch.Tensor] = BytesLRU(budget_bytes=1000)
    lru.put("k", torch.zeros(10))
    lru.put("k", torch.zeros(2))
    assert lru.bytes == 8 and len(lru) == 1
