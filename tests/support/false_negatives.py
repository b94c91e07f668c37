"""Reference losses with false-negative masking, written with explicit loops (math.log/exp) and
independently of the code under test: a candidate with the row's product key is dropped from the
row's softmax, its positive always kept."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_modules.components.false_negatives import product_keys


def unit(x: torch.Tensor) -> list[list[float]]:
    return F.normalize(x.double(), dim=-1).tolist()


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def ce(scores: list[float], label: int, dropped: set[int], tau: float) -> float:
    """-log softmax of ``scores[label]`` over the scores not in ``dropped``."""
    kept = [s for j, s in enumerate(scores) if j == label or j not in dropped]
    return -scores[label] / tau + math.log(sum(math.exp(s / tau) for s in kept))


def symmetric_by_hand(q: torch.Tensor, d: torch.Tensor, keys: list[str] | None, tau: float = 0.2) -> float:
    qs, ds, n = unit(q), unit(d), len(q)
    total = 0.0
    for i in range(n):
        dropped = {j for j in range(n) if keys is not None and j != i and keys[j] == keys[i]}
        total += ce([dot(qs[i], ds[j]) for j in range(n)], i, dropped, tau)
        total += ce([dot(ds[i], qs[j]) for j in range(n)], i, dropped, tau)
    return total / (2 * n)


def keys_of(names: list[str]) -> torch.Tensor:
    return product_keys(names, ["gen"] * len(names))


def _maxsim_by_hand(q: list[float], tokens: torch.Tensor) -> float:
    return max(dot(q, tok) for tok in unit(tokens) if not any(math.isnan(x) for x in tok))


def sprc_contrast_by_hand(q: torch.Tensor, targets: torch.Tensor, keys: list[str] | None, tau: float) -> float:
    qs, n, total = unit(q), len(q), 0.0
    for i in range(n):
        dropped = {j for j in range(n) if keys is not None and j != i and keys[j] == keys[i]}
        total += ce([_maxsim_by_hand(qs[i], targets[j]) for j in range(n)], i, dropped, tau)
    return total / n
