"""MeanPool as the FashionMV paper's eq. 15, against the formula written out independently."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.components.multiview import PER_VIEW_STRATEGIES, per_view_embeddings, pool_view_rows


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _mean(views: list[list[float]]) -> list[float]:
    return [sum(col) / len(views) for col in zip(*views, strict=True)]


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def eq15(q_views: list[list[float]], d_views: list[list[float]]) -> float:
    """s_MeanPool(Q, D) = cos(1/N_Q Σ_i e^Q_i, 1/N_D Σ_j e^D_j), in plain Python."""
    return _cos(_mean(q_views), _mean(d_views))


def normalise_first(q_views: list[list[float]], d_views: list[list[float]]) -> float:
    return _cos(_mean([_unit(v) for v in q_views]), _mean([_unit(v) for v in d_views]))


def _products(unit: bool) -> tuple[torch.Tensor, torch.Tensor, list[list[list[float]]]]:
    """3 products of 1-3 views in 4 dims; view norms 0.1-20 unless ``unit``. Padded slots hold junk
    (NaN and a huge vector) that must not leak into any product."""
    g = torch.Generator().manual_seed(0)
    counts = [3, 1, 2]
    per_view = torch.randn(3, 3, 4, generator=g, dtype=torch.float64)
    scales = torch.tensor([[0.1, 5.0, 20.0], [3.0, 1.0, 1.0], [0.5, 8.0, 1.0]], dtype=torch.float64)
    per_view = torch.nn.functional.normalize(per_view, dim=-1) * (1.0 if unit else scales[..., None])
    mask = torch.tensor([[j < n for j in range(3)] for n in counts])
    per_view[1, 1], per_view[1, 2], per_view[2, 2] = torch.nan, 1e6, torch.nan
    views = [[per_view[b, j].tolist() for j in range(n)] for b, n in enumerate(counts)]
    return per_view, mask, views


def _scores(per_view: torch.Tensor, mask: torch.Tensor, strategy: str) -> torch.Tensor:
    e = per_view_embeddings(per_view, mask, strategy)  # type: ignore[arg-type]
    assert e.shape == (3, 4) and torch.allclose(e.norm(dim=-1), torch.ones(3, dtype=e.dtype))
    return e @ e.T  # products against each other: query = product a, document = product b


def test_meanpool_is_eq15_on_views_of_different_norms() -> None:
    per_view, mask, views = _products(unit=False)
    mean = _scores(per_view, mask, "meanpool")
    first = _scores(per_view, mask, "meanpool_normalised")
    for a in range(3):
        for b in range(3):
            assert mean[a, b].item() == pytest.approx(eq15(views[a], views[b]), abs=1e-5)
            assert first[a, b].item() == pytest.approx(normalise_first(views[a], views[b]), abs=1e-5)
    # Different norms make the two conventions genuinely different scores.
    assert (mean - first).abs().max().item() > 0.05


def test_variants_agree_when_every_view_has_unit_norm() -> None:
    per_view, mask, views = _products(unit=True)
    mean, first = _scores(per_view, mask, "meanpool"), _scores(per_view, mask, "meanpool_normalised")
    assert torch.allclose(mean, first, atol=1e-6)
    assert mean[0, 2].item() == pytest.approx(eq15(views[0], views[2]), abs=1e-5)


def test_pool_view_rows_pools_flat_rows_like_the_grid() -> None:
    per_view, mask, _ = _products(unit=False)
    rows = per_view[mask]
    for strategy in ("meanpool", "meanpool_normalised"):
        assert torch.allclose(pool_view_rows(rows, [3, 1, 2], strategy),  # type: ignore[arg-type]
                              per_view_embeddings(per_view, mask, strategy), atol=1e-6)  # type: ignore[arg-type]


def test_maxsim_keeps_normalised_views_and_unknown_names_are_refused() -> None:
    per_view, mask, _ = _products(unit=False)
    out = per_view_embeddings(per_view, mask, "maxsim")
    assert out.shape == (3, 5, 4) and out[1, 1:].isnan().all()
    assert torch.allclose(out[0, :3].norm(dim=-1), torch.ones(3, dtype=out.dtype))
    assert PER_VIEW_STRATEGIES == ("meanpool", "meanpool_normalised", "maxsim")
    with pytest.raises(ValueError, match="meanpool_normalised"):
        per_view_embeddings(per_view, mask, "mean")  # type: ignore[arg-type]
