"""Faiss indexes for a gallery: named presets or any faiss factory string, trained and tuned.

A kind is a preset (``flat`` exact; ``ivf`` inverted lists; ``hnsw`` a graph; ``ivfpq``: OPQ
rotation, inverted lists and product-quantised codes, for catalogues too large to hold as floats)
or a faiss factory string (``"IVF256,Flat"``, ``"HNSW32"``, ``"OPQ32_128,IVF1024,PQ32"``). Every
index scores by inner product (unit vectors: cosine). Presets are sized from the number of vectors
``n`` and their dimension ``d`` of the dataset they index, so two datasets of one gallery may get
different strings (``factory_for`` says which).

Training runs on a seeded sample of ``train_size`` vectors. A k-means of ``k`` centres is given at
least ``MIN_POINTS_PER_CENTROID * k`` of them (faiss clusters poorly, and warns, below that), so a
catalogue too small for the index asked for is refused up front, with the count it needs.

Query-time knobs (``nprobe`` for inverted lists, ``efSearch`` for HNSW) reach the component that
uses them through the wrappers around it (an OPQ rotation, an IVF whose coarse quantizer is an
HNSW) as faiss ``SearchParameters`` built per call, so concurrent searches never share a setting.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import faiss
import numpy as np
import torch

from datamodules.interfaces import ProgressSink

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq"]
PRESETS: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq")
ADD_CHUNK = 2**16  # vectors added per call when progress is reported
MIN_POINTS_PER_CENTROID = 39  # faiss's own threshold for a k-means it does not warn about
OPQ_CENTROIDS = 256  # OPQ trains an 8-bit product quantizer whatever the index's own codes


def as_f32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _power_of_two(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def ivfpq_sizes(n: int, dim: int, train_size: int = 100_000) -> tuple[int, int]:
    """(nlist, PQ bytes per vector) of the ``ivfpq`` preset.

    ``nlist`` ~ 2·sqrt(n) as a power of two, capped so every cell gets ``MIN_POINTS_PER_CENTROID``
    training points: faiss suggests 4-16·sqrt(n), but training time grows with it (2,048 cells
    for 1M products). A PQ byte per 4 output dimensions, at most 64 bytes: 1/32 of the float
    vector at d=512 (plus 8 bytes of id per vector). The OPQ rotation maps d to 4 dimensions per
    byte (512 -> 256), keeping the directions it finds most useful for the codes."""
    nlist = max(1, min(_power_of_two(2 * math.sqrt(n)), min(n, train_size) // MIN_POINTS_PER_CENTROID))
    m = max(1, min(64, dim // 4))
    return nlist, m


def factory_for(kind: str, n: int, dim: int, nlist: int | None = None, hnsw_m: int = 32,
                pq_m: int | None = None, train_size: int = 100_000) -> str:
    """The faiss factory string a kind stands for at ``n`` vectors of dimension ``dim``."""
    if kind == "flat":
        return "Flat"
    if kind == "ivf":  # 4·sqrt(n) cells, as many as the training sample fills
        auto_nlist = max(1, min(4 * int(math.sqrt(n)), min(n, train_size) // MIN_POINTS_PER_CENTROID))
        return f"IVF{nlist or auto_nlist},Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m}"
    if kind == "ivfpq":
        auto_nlist, m = ivfpq_sizes(n, dim, train_size)
        m = pq_m or m
        d_out = 4 * m if dim >= 4 * m else m * math.ceil(dim / m)  # OPQ's output splits into m equal parts
        rotation = f"OPQ{m}" if d_out == dim else f"OPQ{m}_{d_out}"
        return f"{rotation},IVF{nlist or auto_nlist},PQ{m}"
    return kind


def parse_factory(factory: str, dim: int) -> faiss.Index:
    """The untrained index of a factory string, with inner-product metric; refused in one line."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:  # faiss's message carries a C++ file and line: its last clause says why
        why = str(exc).strip().splitlines()[-1].split(": ")[-1]
        raise ValueError(f"index kind {factory!r} is neither a preset ({', '.join(PRESETS)}) nor a faiss factory "
                         f"string for {dim}-d vectors ({why}); e.g. 'IVF256,Flat', 'HNSW32', "
                         "'OPQ32_128,IVF1024,PQ32'") from None


def _clusterings(index: faiss.Index) -> list[int]:
    """Centre counts of the k-means runs that training ``index`` performs."""
    index = faiss.downcast_index(index)
    ks: list[int] = []
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            if isinstance(faiss.downcast_VectorTransform(index.chain.at(i)), faiss.OPQMatrix):
                ks.append(OPQ_CENTROIDS)
        return ks + _clusterings(index.index)
    if isinstance(index, faiss.IndexIVF):
        ks.append(index.nlist)
    if isinstance(index, faiss.IndexRefine):
        return _clusterings(index.base_index) + _clusterings(index.refine_index)
    if isinstance(index, faiss.IndexHNSW):
        return _clusterings(index.storage)
    pq = getattr(index, "pq", None)
    if isinstance(pq, faiss.ProductQuantizer):
        ks.append(pq.ksub)
    return ks


def training_needs(index: faiss.Index) -> int:
    """How many training vectors ``index`` needs (0: it trains nothing)."""
    ks = _clusterings(index)
    if not ks:
        return 0
    k = max(ks)
    return 1 if k == 1 else MIN_POINTS_PER_CENTROID * k


def _lighter_training(index: faiss.Index, opq_iterations: int) -> None:
    """Training cost cut where faiss's defaults buy nothing a gallery search uses: polysemous
    codes (only read by Hamming-filtered search, never used here) are not trained, and OPQ runs
    ``opq_iterations`` alternations (faiss: 50) after as many k-means iterations of its first PQ
    (faiss: 40), on 39 points per PQ centre (faiss: 256). Faiss's k-means over OPQ64's 4-d
    sub-vectors is slow: with 10 alternations over 16-64K points OPQ alone took minutes on the
    2-core box, while the whole ``ivfpq`` build now takes 20 s at 100K and 42 s at 1M products of
    d=512 (``benchmarks/ann.py``). The recall barely depends on these settings: at 100K 512-d
    products, recall@10 (nprobe 16) was 0.68 / 0.67 / 0.65 without re-ranking and 0.996 with it
    (top 100) after 25 / 10 / 5 alternations on 16K / 64K / 10K points (and faiss's 40 first-PQ
    iterations); these settings give 0.664 and 0.997."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = transform.niter_pq_0 = opq_iterations
                transform.max_train_points = MIN_POINTS_PER_CENTROID * OPQ_CENTROIDS
        _lighter_training(index.index, opq_iterations)
        return
    if isinstance(index, faiss.IndexRefine):
        _lighter_training(index.base_index, opq_iterations)
        return
    ivf = find_ivf(index)
    for part in (index, ivf):
        if part is not None and hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def build_faiss_index(vectors: Any, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
                      hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 40,
                      pq_m: int | None = None, opq_iterations: int = 10, train_size: int = 100_000,
                      seed: int = 0, progress: ProgressSink | None = None) -> faiss.Index:
    """A trained faiss index over ``vectors`` ``[n, d]``; ``kind`` a preset or a factory string.
    ``progress`` counts the vectors added (they are then added in chunks; training is one call)."""
    vectors = as_f32(vectors)
    n, dim = vectors.shape
    factory = factory_for(kind, n, dim, nlist, hnsw_m, pq_m, train_size)
    index = parse_factory(factory, dim)
    _lighter_training(index, opq_iterations)
    hnsw = find_hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        sample_size = min(n, train_size)
        needs = training_needs(index)
        if needs > sample_size:
            limit = f"train_size={train_size:,}" if train_size < n else f"the dataset has {n:,}"
            raise ValueError(f"index {factory!r} needs at least {needs:,} training vectors "
                             f"({MIN_POINTS_PER_CENTROID} per k-means centre) and {limit}: use a smaller nlist "
                             "or PQ, or kind flat or hnsw")
        rng = np.random.default_rng(seed)
        sample = vectors if sample_size == n else vectors[np.sort(rng.choice(n, size=sample_size, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(f"index {factory!r} cannot be trained on {sample_size:,} vectors: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
    set_defaults(index, nprobe=nprobe if find_ivf(index) is not None else None,
                 ef_search=ef_search if hnsw is not None else None)
    if progress is None:
        index.add(vectors)
        return index
    for start in range(0, n, ADD_CHUNK):
        index.add(vectors[start:start + ADD_CHUNK])
        progress.update(min(ADD_CHUNK, n - start))
    return index


def find_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The inverted-list index inside ``index`` (wrapped by OPQ or a refinement), if any."""
    found = faiss.try_extract_index_ivf(index)
    return None if found is None else faiss.downcast_index(found)


def find_hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW graph inside ``index``: the index itself or an IVF's coarse quantizer."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return find_hnsw(index.index)
    if isinstance(index, faiss.IndexRefine):
        return find_hnsw(index.base_index)
    if isinstance(index, faiss.IndexHNSW):
        return index
    ivf = find_ivf(index)
    if ivf is not None:
        quantizer = faiss.downcast_index(ivf.quantizer)
        return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None
    return None


def set_defaults(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """The settings a search without per-call knobs uses (faiss saves them with the index)."""
    if nprobe is not None:
        ivf = find_ivf(index)
        if ivf is None:
            raise ValueError(f"nprobe: a {type(faiss.downcast_index(index)).__name__} has no inverted lists")
        ivf.nprobe = max(1, min(nprobe, ivf.nlist))
    if ef_search is not None:
        hnsw = find_hnsw(index)
        if hnsw is None:
            raise ValueError(f"ef_search: a {type(faiss.downcast_index(index)).__name__} has no HNSW graph")
        hnsw.hnsw.efSearch = max(1, ef_search)


def search_parameters(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None,
                      keep: list[Any] | None = None) -> faiss.SearchParameters | None:
    """Per-call ``SearchParameters`` for ``index``: ``nprobe`` for its inverted lists, ``ef_search``
    for its HNSW graph (None: the index's default). ``keep`` collects the nested objects, which the
    caller holds until the search returns (faiss keeps only raw pointers to them)."""
    if nprobe is None and ef_search is None:
        return None
    keep = [] if keep is None else keep
    if nprobe is not None and find_ivf(index) is None:
        raise ValueError(f"nprobe: a {type(faiss.downcast_index(index)).__name__} has no inverted lists")
    if ef_search is not None and find_hnsw(index) is None:
        raise ValueError(f"ef_search: a {type(faiss.downcast_index(index)).__name__} has no HNSW graph")
    return _parameters(faiss.downcast_index(index), nprobe, ef_search, keep)


def _parameters(index: faiss.Index, nprobe: int | None, ef_search: int | None,
                keep: list[Any]) -> faiss.SearchParameters | None:
    keep.append(index)
    params: faiss.SearchParameters
    if isinstance(index, faiss.IndexPreTransform):
        inner = _parameters(faiss.downcast_index(index.index), nprobe, ef_search, keep)
        if inner is None:
            return None
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(nprobe or index.nprobe, index.nlist))
        quantizer = _parameters(faiss.downcast_index(index.quantizer), None, ef_search, keep) if ef_search else None
        if quantizer is not None:
            params.quantizer_params = quantizer
    elif isinstance(index, faiss.IndexRefine):  # re-scores k_factor x k candidates of its base index
        inner = _parameters(faiss.downcast_index(index.base_index), nprobe, ef_search, keep)
        if inner is None:
            return None
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = index.k_factor
        params.base_index_params = inner
    elif isinstance(index, faiss.IndexHNSW) and ef_search is not None:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(1, ef_search)
    else:
        return None
    keep.append(params)
    return params
