"""Approximate gallery search at 100K and 1M products: build time, memory, queries/s, recall@10.

    python benchmarks/ann.py                         # 100K and 1M, model dimension (48) and 512
    python benchmarks/ann.py --quick                 # 20K only, fewer knob values (a minute or two)
    python benchmarks/ann.py --sizes 100000 --dims 512 --seed 1

What is searched. Never i.i.d. random vectors (no neighbourhood structure: the worst case for every
approximate index and unlike any model's space), but vectors with the structure of a trained
model's embeddings:

1. The demo CLIP4CIR model (``experiments/demos/clip4cir.yaml``, ``outputs/clip4cir_demo/
   checkpoints/last.ckpt``) embeds every gallery product of the generated data (train and val
   splits, ``data/synthetic``: 1,500 products, 48-d unit vectors) and every triplet's query (2,512).
   ``--cache FILE`` keeps these embeddings between runs.
2. A mixture is fitted to the gallery embeddings: spherical k-means (``--clusters`` 32 centres,
   at least 39 products each), and per cluster a Gaussian around its members' mean with their
   covariance, shrunk towards the pooled within-cluster covariance (weight ``d`` pseudo-points:
   a cluster of ~47 products cannot estimate a 48 x 48 covariance on its own). Cluster weights
   are the clusters' shares of the products.
3. N products are drawn from the mixture and normalised to unit length: the model's cluster
   layout, cluster sizes and within-cluster shapes (its embedding spectrum is steep: ~10
   directions hold 97% of the variance), at any N. Queries are the model's own query embeddings
   (1,000 drawn from the 2,512), so the query/gallery offset of the real model is kept.
4. Dimension 512 (CLIP ViT-B/32's) is reported too, as a documented lift of the same data: each
   48-d vector x becomes ``U x + r`` normalised, where ``U`` (512 x 48) has random orthonormal
   columns (an isometry: the 48-d geometry is kept exactly) and ``r`` lies in the 464 remaining
   directions with a power-law spectrum ``i^-alpha`` (``--lift-alpha`` 1.0), in a basis rotated
   per cluster, carrying ``--lift-share`` (1.0) times the model's own within-cluster variance.
   This is an assumption, not a measurement: a 512-d encoder spreads its residual over more
   directions than the tiny model (whose own spectrum decays as ~i^-3.3), and extra directions of
   residual make neighbourhoods harder to search, so the 512 rows are the harder case. A query
   gets the residual of the cluster nearest to it.

Rows: ``flat`` (exact; its top-10 is the reference), HNSW (``hnsw``: HNSW32), IVF-Flat (``ivf``),
IVF-SQ4 (the same cells, 4-bit scalar codes: the smallest code here that re-ranks without float
vectors), the ``ivfpq`` preset (OPQ + IVF + PQ sized from N and d) without and with exact
re-ranking of the top ``--rerank`` (100) candidates from the stored float vectors, each at a few query-time knob
values (one build, per-call ``nprobe`` / ``ef_search`` / ``rerank``). Memory is the bytes a saved
index takes: the faiss file, plus the stored float vectors (``.npy``, memory-mapped on load) where
re-ranking needs them; the ids (the same for every row) are left out. Queries/s: 1,000 queries,
top-10, one batch call (``GalleryIndex.search``, ids and scores as Python lists included), median
of ``--repeats``. The goal checked per size and dimension: recall@10 >= 0.95 at >= 10x flat's
queries/s in <= 1/8 of flat's bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from datamodules.atomic import atomic_write
from lightning_modules.retrieval import GalleryIndex
from lightning_modules.retrieval.ann import factory_for

DEMO = "experiments/demos/clip4cir.yaml"
CKPT = "outputs/clip4cir_demo/checkpoints/last.ckpt"
K = 10


# -- the model's embeddings and a distribution fitted to them --------------------------------------


def embed_demo(config: str, ckpt: str, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(gallery [P, d], queries [T, d]) of the trained demo model over the generated data."""
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            return saved["gallery"], saved["queries"]
    import torch

    from cir.models import encode_gallery, load_model_and_data

    model, dm = load_model_and_data([config], ckpt, ["--data.init_args.num_workers=0"])
    gallery, queries = [], []
    with torch.no_grad():
        for split in dm.manifest["splits"]:
            gallery.append(encode_gallery(model, dm, split)[0])
            queries += [model.encode_query(batch).float() for batch in dm.eval_dataloaders(split)[1]]
    g, q = torch.cat(gallery).numpy(), torch.cat(queries).numpy()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda f: np.savez(f, gallery=g, queries=q))
    return g, q


@dataclass
class Mixture:
    means: np.ndarray  # [C, d]
    chols: np.ndarray  # [C, d, d] Cholesky factors of the shrunk covariances
    weights: np.ndarray  # [C]
    within: float  # trace of the pooled within-cluster covariance


def fit_mixture(x: np.ndarray, clusters: int, seed: int) -> Mixture:
    d = x.shape[1]
    km = faiss.Kmeans(d, clusters, niter=50, seed=seed, spherical=True)
    km.train(x)
    labels = km.index.search(x, 1)[1][:, 0]
    means = np.stack([x[labels == c].mean(0) for c in range(clusters)])
    resid = x - means[labels]
    pooled = resid.T @ resid / len(x)
    chols, weights = [], []
    for c in range(clusters):
        r = resid[labels == c]
        cov = (r.T @ r + d * pooled) / (len(r) + d)
        chols.append(np.linalg.cholesky(cov + 1e-7 * np.eye(d)))
        weights.append(len(r) / len(x))
    return Mixture(means, np.stack(chols), np.array(weights), float(np.trace(pooled)))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Lift:
    up: np.ndarray  # [D, d] orthonormal columns
    bases: np.ndarray  # [C, D - d, D] per-cluster rows spanning the complement, scaled by the spectrum


def make_lift(mix: Mixture, dim: int, alpha: float, share: float, rng: np.random.Generator) -> Lift:
    d = mix.means.shape[1]
    full, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    up, rest = full[:, :d], full[:, d:]
    spectrum = np.arange(1, dim - d + 1, dtype=np.float64) ** -alpha
    scale = np.sqrt(share * mix.within * spectrum / spectrum.sum())
    bases = []
    for _ in range(len(mix.means)):
        rot, _ = np.linalg.qr(rng.standard_normal((dim - d, dim - d)))
        bases.append((scale[:, None] * (rest @ rot).T).astype(np.float32))
    return Lift(up.astype(np.float32), np.stack(bases))


def sample(mix: Mixture, n: int, rng: np.random.Generator, lift: Lift | None) -> np.ndarray:
    """``n`` unit vectors from the mixture (lifted when ``lift`` is given), in a shuffled order."""
    counts = rng.multinomial(n, mix.weights)
    dim = mix.means.shape[1] if lift is None else lift.up.shape[0]
    out = np.empty((n, dim), np.float32)
    start = 0
    for c, count in enumerate(counts):
        for s in range(0, count, 65536):
            m = min(65536, count - s)
            x = (mix.means[c] + rng.standard_normal((m, mix.means.shape[1])) @ mix.chols[c].T).astype(np.float32)
            if lift is not None:
                x = x @ lift.up.T + rng.standard_normal((m, lift.bases.shape[1]), dtype=np.float32) @ lift.bases[c]
            out[start:start + m] = unit(x)
            start += m
    return out[rng.permutation(n)]


def lift_queries(q: np.ndarray, mix: Mixture, lift: Lift, rng: np.random.Generator) -> np.ndarray:
    nearest = np.argmax(q @ unit(mix.means).T, axis=1)
    noise = rng.standard_normal((len(q), lift.bases.shape[1]), dtype=np.float32)
    return unit(q @ lift.up.T + np.einsum("nr,nrd->nd", noise, lift.bases[nearest]))


# -- the measured methods ------------------------------------------------------------------------


@dataclass
class Method:
    label: str
    kind: str
    options: dict[str, Any]
    knobs: list[dict[str, int]]  # per-call search settings, one row each
    with_vectors: bool = False  # the stored float vectors count in its memory (re-ranking reads them)


def methods(quick: bool, depths: list[int]) -> list[Method]:
    few = (lambda values: values[:2]) if quick else (lambda values: values)
    pq = {"store_vectors": True, "opq_iterations": 4 if quick else 10}
    return [
        Method("flat (exact)", "flat", {}, [{}]),
        Method("HNSW32", "hnsw", {"hnsw_m": 32, "ef_construction": 40}, [{"ef_search": e} for e in few([16, 32, 64])]),
        Method("IVF-Flat", "ivf", {}, [{"nprobe": p} for p in few([8, 16, 32])]),
        # 4 bits per dimension: the smallest code here that needs no float vectors to re-rank.
        Method("IVF-SQ4", "ivf-sq4", {}, [{"nprobe": p} for p in few([16, 32])]),
        # One ivfpq build serves both rows: re-ranking is a per-call knob over its stored vectors.
        Method("OPQ+IVF-PQ", "ivfpq", pq, [{"nprobe": p} for p in few([16, 64])]),
        Method("OPQ+IVF-PQ + rerank", "ivfpq", pq,
               [{"nprobe": p, "rerank": r} for r in depths for p in few([16, 32, 64])], with_vectors=True),
    ]


def kind_of(method: Method, n: int, dim: int) -> str:
    """The kind a method builds: a preset, or the ``ivf`` preset's cells with 4-bit scalar codes."""
    return factory_for("ivf", n, dim).replace(",Flat", ",SQ4") if method.kind == "ivf-sq4" else method.kind


def saved_bytes(index: GalleryIndex) -> tuple[int, int]:
    """(faiss file bytes, stored vector bytes) of ``index`` saved to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="ann-bench-") as folder:
        index.save(folder)
        files = list(Path(folder).iterdir())
        return (sum(f.stat().st_size for f in files if f.suffix == ".faiss"),
                sum(f.stat().st_size for f in files if f.suffix == ".npy"))


def timed_search(index: GalleryIndex, q: np.ndarray, repeats: int, **knobs: int) -> tuple[float, np.ndarray]:
    """(queries/s, [Q, K] rows) of one batch call, the median of ``repeats``."""
    times, hits = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        hits = index.search(q, K, **knobs)
        times.append(time.perf_counter() - start)
    rows = np.array([[int(p) for p, _ in h] + [-1] * (K - len(h)) for h in hits])
    return len(q) / float(np.median(times)), rows


def recall_at_k(rows: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows, exact, strict=True)]))


def knob_text(knobs: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items()) or "-"


def run(n: int, dim: int, gallery: np.ndarray, queries: np.ndarray, chosen: list[Method],
        repeats: int) -> list[dict[str, Any]]:
    ids, names = [str(i) for i in range(n)], ["bench"] * n
    rows: list[dict[str, Any]] = []
    exact: np.ndarray | None = None
    flat_qps = flat_bytes = float("nan")
    built: dict[tuple[str, str], tuple[GalleryIndex, float, tuple[int, int]]] = {}
    for method in chosen:
        key = (method.kind, repr(sorted(method.options.items())))
        if key not in built:
            built.clear()  # one large index in memory at a time
            index = None
            start = time.perf_counter()
            index = GalleryIndex.build(gallery, ids, names, kind=kind_of(method, n, dim), **method.options)
            built[key] = (index, time.perf_counter() - start, saved_bytes(index))
        index, build_s, (index_bytes, vector_bytes) = built[key]
        vector_bytes = vector_bytes if method.with_vectors else 0
        for knobs in method.knobs:
            qps, found = timed_search(index, queries, repeats, **knobs)
            if exact is None:  # the flat row comes first: its top-K is the reference
                exact, flat_qps, flat_bytes = found, qps, index_bytes
            row = {"n": n, "dim": dim, "method": method.label, "factory": index.factories["bench"],
                   "knobs": knob_text(knobs), "build_s": build_s, "index_mb": index_bytes / 2**20,
                   "vectors_mb": vector_bytes / 2**20, "memory_ratio": (index_bytes + vector_bytes) / flat_bytes,
                   "index_ratio": index_bytes / flat_bytes, "qps": qps, "speedup": qps / flat_qps,
                   "recall": recall_at_k(found, exact)}
            rows.append(row)
            print_row(row)
    return rows


HEADER = (f"{'N':>9} {'d':>4} {'method':<23} {'knobs':<18} {'build s':>8} {'index MB':>9} {'vectors MB':>10} "
          f"{'mem/flat':>8} {'queries/s':>10} {'x flat':>7} {'recall@10':>9}")


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['n']:>9,} {r['dim']:>4} {r['method']:<23} {r['knobs']:<18} {r['build_s']:>8.1f} {r['index_mb']:>9.1f} "
          f"{r['vectors_mb']:>10.1f} {r['memory_ratio']:>8.3f} {r['qps']:>10,.0f} {r['speedup']:>7.1f} "
          f"{r['recall']:>9.3f}", flush=True)


def verdicts(rows: list[dict[str, Any]]) -> None:
    """Per size and dimension: the rows reaching recall >= 0.95 at >= 10x flat, and their memory."""
    print("\ngoal: recall@10 >= 0.95 at >= 10x flat's queries/s in <= 1/8 of flat's bytes")
    for n, dim in sorted({(r["n"], r["dim"]) for r in rows}):
        fast = [r for r in rows if (r["n"], r["dim"]) == (n, dim) and r["recall"] >= 0.95 and r["speedup"] >= 10]
        met = [r for r in fast if r["memory_ratio"] <= 1 / 8]
        resident = [r for r in fast if r["index_ratio"] <= 1 / 8 and r not in met]
        where = f"N={n:,} d={dim}:"
        if met:
            best = max(met, key=lambda r: r["qps"])
            print(f"{where} reached by {best['method']} {best['knobs']} (recall {best['recall']:.3f}, "
                  f"{best['speedup']:.0f}x, {best['memory_ratio']:.3f} of flat's bytes)")
        elif resident:
            best = max(resident, key=lambda r: r["qps"])
            print(f"{where} not reached in bytes stored; {best['method']} {best['knobs']} reaches recall "
                  f"{best['recall']:.3f} at {best['speedup']:.0f}x with an index of {best['index_ratio']:.3f} of "
                  f"flat's bytes, but re-ranks from {best['vectors_mb']:,.0f} MB of float vectors on disk "
                  "(memory-mapped: only the candidates' pages are read)")
        elif fast:
            best = min(fast, key=lambda r: r["memory_ratio"])
            print(f"{where} speed and recall reached ({best['method']} {best['knobs']}), memory not "
                  f"({best['memory_ratio']:.3f} of flat's bytes)")
        else:
            print(f"{where} not reached: no row has recall >= 0.95 at >= 10x flat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[48, 512],
                        help="48: the model's own space; larger: the documented lift")
    parser.add_argument("--seed", type=int, default=0, help="seeds the fit, the lift, the samples and the queries")
    parser.add_argument("--quick", action="store_true",
                        help="20K products, two knob values per method, OPQ with 4 alternations (a few minutes)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="searches per row; the median time is reported")
    parser.add_argument("--rerank", type=int, nargs="+", default=[100],
                        help="re-ranking depths of the OPQ+IVF-PQ + rerank rows")
    parser.add_argument("--clusters", type=int, default=32, help="k-means centres of the fitted mixture")
    parser.add_argument("--lift-alpha", type=float, default=1.0, help="power-law exponent of the lifted residual")
    parser.add_argument("--lift-share", type=float, default=1.0,
                        help="variance of the lifted residual, in units of the model's within-cluster variance")
    parser.add_argument("--methods", nargs="+", help="only these methods, by the first word of their label (HNSW32 "
                        "IVF-Flat IVF-SQ4 OPQ+IVF-PQ); flat always runs")
    parser.add_argument("--config", default=DEMO)
    parser.add_argument("--ckpt", default=CKPT)
    parser.add_argument("--cache", type=Path, help="npz of the model's embeddings: read if present, else written")
    args = parser.parse_args()
    sizes = [20_000] if args.quick else args.sizes

    gallery, model_queries = embed_demo(args.config, args.ckpt, args.cache)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss/OpenMP threads "
          f"{faiss.omp_get_max_threads()}, load average {load[0]:.1f} at start (shared with other work)")
    print(f"model: {args.ckpt} ({gallery.shape[1]}-d): {len(gallery):,} gallery products, {len(model_queries):,} "
          f"queries embedded; mixture of {args.clusters} clusters; {args.queries:,} queries, top-{K}, median of "
          f"{args.repeats} batch searches\n")
    rng = np.random.default_rng(args.seed)
    mix = fit_mixture(gallery, args.clusters, args.seed)
    picked = model_queries[rng.choice(len(model_queries), size=min(args.queries, len(model_queries)), replace=False)]
    chosen = [m for m in methods(args.quick, args.rerank)
              if not args.methods or m.label.split()[0].rstrip(",") in args.methods or m.kind == "flat"]
    print(HEADER)
    print("-" * len(HEADER))
    rows: list[dict[str, Any]] = []
    for dim in args.dims:
        lift = None if dim == gallery.shape[1] else make_lift(mix, dim, args.lift_alpha, args.lift_share,
                                                             np.random.default_rng([args.seed, dim]))
        queries = (picked if lift is None
                   else lift_queries(picked, mix, lift, np.random.default_rng([args.seed, dim, 1])))
        for n in sizes:
            products = sample(mix, n, np.random.default_rng([args.seed, dim, n]), lift)
            rows += run(n, dim, products, queries, chosen, args.repeats)
            del products
    verdicts(rows)


if __name__ == "__main__":
    main()
