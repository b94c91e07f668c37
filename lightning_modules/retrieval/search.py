"""Exact gallery search that never materialises a queries × gallery matrix.

Scores are computed one (query chunk × gallery chunk) block at a time, so memory stays at
``chunk_size²`` floats whatever the gallery size; faiss (``IndexFlatIP``) is the alternative for
top-k lists on the CPU, where its BLAS kernels win on large galleries.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .gallery_index import build_faiss_index

Backend = Literal["auto", "torch", "faiss"]


def resolve_backend(backend: Backend, queries: torch.Tensor) -> Literal["torch", "faiss"]:
    """``auto``: a faiss flat index for single vectors on the CPU (measured at least as fast as
    torch's chunked search there: ``benchmarks/search_backends.py``), torch on a GPU (no copy to the
    host) and for MaxSim multi-vectors (which faiss cannot score)."""
    if backend != "auto":
        return backend
    return "faiss" if queries.ndim == 2 and queries.device.type == "cpu" else "torch"


def maxsim(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """MaxSim scores ``[n, m]`` of multi-vector items ``[n, V, D]`` × ``[m, W, D]``: the best pair
    of views. Rows of NaN are padding (products with fewer views) and never score."""
    q_ok, g_ok = ~queries[..., 0].isnan(), ~gallery[..., 0].isnan()
    s = torch.einsum("nvd,mwd->nmvw", queries.nan_to_num(0.0), gallery.nan_to_num(0.0))
    s = s.masked_fill(~(q_ok[:, None, :, None] & g_ok[None, :, None, :]), -torch.inf)
    return s.amax(dim=(2, 3))


MAXSIM_BLOCK = 2**25  # scores held at once by a MaxSim block (128 MiB of float32)


def block_size(queries: torch.Tensor, gallery: torch.Tensor, chunk_size: int) -> int:
    """Rows per chunk. MaxSim scores every view pair, a (chunk × chunk × V × W) block: the chunk
    shrinks so the block stays under ``MAXSIM_BLOCK`` (SPRC's 5 × 32-token targets would otherwise
    ask for tens of GB at the single-vector chunk of 4096)."""
    if queries.ndim == 2:
        return chunk_size
    pairs = queries.shape[1] * gallery.shape[1]
    return max(1, min(chunk_size, int((MAXSIM_BLOCK / pairs) ** 0.5)))


def similarities(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` scores: dot products of single vectors, or MaxSim of ``[*, V, D]`` multi-vectors."""
    return queries @ gallery.T if queries.ndim == 2 else maxsim(queries, gallery)


def target_ranks(queries: torch.Tensor, gallery: torch.Tensor, target_index: torch.Tensor,
                 chunk_size: int = 4096, exclude_index: torch.Tensor | None = None) -> torch.Tensor:
    """0-based pessimistic rank of each query's target: how many other gallery items score at least
    as high as the target. A tie never favours the target, so a model whose embeddings are constant
    or zero ranks every target last instead of first.

    ``target_index[i] < 0`` means the target is absent from the gallery: rank = len(gallery).
    ``exclude_index[i]`` (>= 0) is a gallery item not to count for query i (its own source).

    The target's score is read from the same block computation as the items it is compared with
    (a first pass over the blocks that hold targets), not from a separate dot product: a matmul and
    a dot product may round the same pair differently, which would turn exact ties into wins.
    """
    n = queries.shape[0]
    chunk_size = block_size(queries, gallery, chunk_size)
    ranks = torch.full((n,), gallery.shape[0], dtype=torch.long, device=queries.device)
    present = target_index >= 0
    if n == 0 or gallery.shape[0] == 0 or not present.any():
        return ranks
    counts = torch.zeros(n, dtype=torch.long, device=queries.device)
    for qs in range(0, n, chunk_size):
        q = queries[qs : qs + chunk_size]
        own = target_index[qs : qs + chunk_size]
        skip = exclude_index[qs : qs + chunk_size, None] if exclude_index is not None else None
        t = torch.full((q.shape[0],), torch.inf, dtype=q.dtype, device=q.device)
        holding = torch.unique(own[own >= 0] // chunk_size).tolist()
        for gs in (b * chunk_size for b in holding):
            rows = (own >= gs) & (own < gs + chunk_size)
            s = similarities(q, gallery[gs : gs + chunk_size])
            t[rows] = s[rows, own[rows] - gs]
        for gs in range(0, gallery.shape[0], chunk_size):
            block = gallery[gs : gs + chunk_size]
            cols = torch.arange(gs, gs + block.shape[0], device=q.device)[None]
            at_least = (similarities(q, block) >= t[:, None]) & (cols != own[:, None])
            if skip is not None:
                at_least &= cols != skip
            counts[qs : qs + chunk_size] += at_least.sum(1)
    ranks[present] = counts[present]
    return ranks


def faiss_target_ranks(queries: torch.Tensor, gallery: torch.Tensor, target_index: torch.Tensor, depth: int,
                       exclude_index: torch.Tensor | None = None) -> torch.Tensor:
    """The pessimistic ranks of ``target_ranks`` from a faiss flat index's top list, exact below
    ``depth``; a target ranked ``depth`` or lower (or absent) gets ``depth``.

    The list is fetched one longer than ``depth`` (two with an excluded source), and the target's
    score is the one faiss reports for it there, so ties are judged on faiss's own arithmetic: an
    item missing from the list with a score equal to the target's implies that every listed item
    scores at least that much, and the count then reaches ``depth`` anyway.
    """
    n = queries.shape[0]
    ranks = torch.full((n,), depth, dtype=torch.long)
    if n == 0 or gallery.shape[0] == 0:
        return ranks
    length = depth + 1 + (1 if exclude_index is not None else 0)
    scores, idx = topk(queries, gallery, length, backend="faiss")
    own = target_index.cpu()[:, None]
    is_target = idx == own
    found = is_target.any(1) & (own[:, 0] >= 0)
    t = torch.where(is_target, scores, torch.full_like(scores, -torch.inf)).amax(1)
    others = (idx >= 0) & ~is_target
    if exclude_index is not None:
        others &= idx != exclude_index.cpu()[:, None]
    counted = (others & (scores >= t[:, None])).sum(1)
    ranks[found] = counted[found].clamp(max=depth)
    return ranks


def topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 4096,
         backend: Backend = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the ``k`` best gallery items per query, best first."""
    k = min(k, gallery.shape[0])
    if resolve_backend(backend, queries) == "faiss":
        if queries.ndim != 2:
            raise ValueError("the faiss backend searches single vectors; MaxSim multi-vectors need backend='torch'")
        index = build_faiss_index(gallery.detach().float().cpu().numpy(), "flat")
        scores, idx = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(idx).long()
    out_s, out_i = [], []
    chunk_size = block_size(queries, gallery, chunk_size)
    for qs in range(0, queries.shape[0], chunk_size):
        q = queries[qs : qs + chunk_size]
        best_s = torch.full((q.shape[0], k), -torch.inf, dtype=q.dtype, device=q.device)
        best_i = torch.zeros((q.shape[0], k), dtype=torch.long, device=q.device)
        for gs in range(0, gallery.shape[0], chunk_size):
            block = gallery[gs : gs + chunk_size]
            s, i = similarities(q, block).topk(min(k, block.shape[0]), dim=1)
            merged_s, order = torch.cat([best_s, s], 1).topk(k, dim=1)
            best_i = torch.cat([best_i, i + gs], 1).gather(1, order)
            best_s = merged_s
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)
