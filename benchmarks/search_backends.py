"""Gallery search: chunked exact search in torch vs faiss exact (flat) vs faiss approximate (IVF, HNSW).

    python benchmarks/search_backends.py                       # 10K and 100K products
    python benchmarks/search_backends.py --sizes 10000 100000 1000000 --kinds torch flat ivf
    python benchmarks/search_backends.py --sizes 10000 100000 --kinds torch flat --recall   # + evaluation

Random unit vectors of dimension 1024 stand for product embeddings; each query is a noisy copy of
one gallery vector (the "planted" answer). Such vectors have no neighbourhood structure besides
the planted one, the worst case for approximate indexes: ``benchmarks/ann.py`` measures them on
vectors with a trained model's structure. ``--kinds`` takes ``torch`` and any ``GalleryIndex``
kind: the presets (flat, ivf, hnsw, ivfpq) or a faiss factory string (``"IVF1024,SQ8"``).

For each gallery size and method it prints the build time, queries per second for top-10 search,
the recall@10 of the method's top-10 against the exact top-10, and how often the planted answer is
in the top-10. ``--recall`` adds what evaluation does
(``RecallAtK.compute``: every query ranked in the whole gallery) with each exact backend.
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
import torch

from lightning_modules.retrieval import RecallAtK
from lightning_modules.retrieval.ann import build_faiss_index, find_ivf
from lightning_modules.retrieval.search import topk


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", default=["torch", "flat", "ivf", "hnsw"])
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.6, help="norm of the noise added to planted queries")
    parser.add_argument("--repeats", type=int, default=3, help="searches per method; the median time is reported")
    parser.add_argument("--recall", action="store_true", help="also time RecallAtK.compute per exact backend")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    blas = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_"))}
    print(f"threads: torch {torch.get_num_threads()} (intra-op), faiss/OpenMP {faiss.omp_get_max_threads()}; "
          f"{os.cpu_count()} CPUs; env {blas or '-'}")
    print(f"dim {args.dim}; {args.queries} queries; top-{args.k}; median of {args.repeats} searches\n")
    print(f"{'gallery':>9} {'method':<22} {'build s':>8} {'queries/s':>10} {'recall@10 vs exact':>19} "
          f"{'planted in top-10':>18}")
    print("-" * 91)
    for n in args.sizes:
        gallery = unit(rng.standard_normal((n, args.dim), dtype=np.float32))
        picks = rng.integers(0, n, args.queries)
        # Noise of norm ~0.6 around a planted gallery vector: the planted product is the clear answer,
        # the rest of the exact top-10 is near-random (the hard case for approximate search).
        noise = rng.standard_normal((args.queries, args.dim), dtype=np.float32) * (args.noise / np.sqrt(args.dim))
        queries = unit(gallery[picks] + noise)
        exact: np.ndarray | None = None
        for kind in args.kinds:
            t = time.perf_counter()
            if kind == "torch":
                g, q = torch.from_numpy(gallery), torch.from_numpy(queries)
                build = 0.0
                label = "torch exact"

                def search(q: torch.Tensor = q, g: torch.Tensor = g) -> np.ndarray:
                    return topk(q, g, args.k, chunk_size=4096)[1].numpy()
            else:
                index = build_faiss_index(gallery, kind, nprobe=args.nprobe)
                build = time.perf_counter() - t
                probes = f"/{args.nprobe}" if find_ivf(index) is not None else ""
                label = f"faiss {kind}{probes}"

                def search(index: faiss.Index = index, queries: np.ndarray = queries) -> np.ndarray:
                    return index.search(queries, args.k)[1]
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                idx = search()
                times.append(time.perf_counter() - t)
            seconds = float(np.median(times))
            if exact is None and kind in ("torch", "flat"):
                exact = idx
            recall = (np.mean([len(set(a) & set(b)) / args.k for a, b in zip(idx, exact, strict=True)])
                      if exact is not None else float("nan"))
            planted = np.mean([p in row for p, row in zip(picks, idx, strict=True)])
            print(f"{n:>9,} {label:<22} {build:>8.2f} {args.queries / seconds:>10,.0f} {recall:>19.3f} "
                  f"{planted:>18.3f}", flush=True)
        if args.recall:
            for backend in ("torch", "faiss"):
                metric = RecallAtK(top_k=(1, 5, args.k), backend=backend)
                metric.update(torch.from_numpy(gallery), torch.arange(n), torch.zeros(n, dtype=torch.long),
                              gallery=True)
                targets = torch.from_numpy(picks)
                metric.update(torch.from_numpy(queries), targets, torch.zeros(args.queries, dtype=torch.long),
                              gallery=False, source_ids=targets)
                t = time.perf_counter()
                out = metric.compute()
                seconds = time.perf_counter() - t
                print(f"{n:>9,} {'RecallAtK ' + backend:<22} {0.0:>8.2f} {args.queries / seconds:>10,.0f} "
                      f"{'-':>19} {float(out[f'recall_at_{args.k}']):>18.3f}", flush=True)


if __name__ == "__main__":
    main()
