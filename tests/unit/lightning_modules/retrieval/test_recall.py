from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules.schema import stable_id
from lightning_modules.retrieval.recall import NonFiniteEmbeddings, RecallAtK, subset_tensor
from lightning_modules.retrieval.search import target_ranks, topk


def _brute_force(q, q_tgt, q_ds, g, g_ids, g_ds, k, q_src=None, protocol="all", remove_source=False):
    """Full score matrix per query, sort, check the target's position."""
    hits = []
    for i in range(len(q)):
        keep = g_ds == q_ds[i]
        if protocol == "queries":  # only products some query of this dataset uses
            used = set(q_tgt[q_ds == q_ds[i]].tolist()) | set(q_src[q_ds == q_ds[i]].tolist())
            keep &= torch.tensor([int(x) in used for x in g_ids])
        if remove_source:
            keep &= g_ids != q_src[i]
        sel = keep.nonzero().flatten()
        scores = g[sel] @ q[i]
        order = sel[torch.argsort(scores, descending=True)]
        hits.append(bool((g_ids[order[:k]] == q_tgt[i]).any()))
    return torch.tensor(hits, dtype=torch.float)


@pytest.fixture
def embeddings():
    gen = torch.Generator().manual_seed(0)
    g = F.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    g_ids = torch.arange(300) * 7 + 3
    g_ds = torch.randint(0, 3, (300,), generator=gen)
    tgt = torch.randint(0, 300, (120,), generator=gen)
    q = F.normalize(g[tgt] + 0.9 * torch.randn(120, 16, generator=gen), dim=-1)
    q_tgt, q_ds = g_ids[tgt].clone(), g_ds[tgt].clone()
    q_tgt[:5] = 10**9  # targets absent from the gallery: always a miss
    return q, q_tgt, q_ds, g, g_ids, g_ds


@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
def test_recall_matches_brute_force(embeddings, backend) -> None:
    q, q_tgt, q_ds, g, g_ids, g_ds = embeddings
    metric = RecallAtK(["a", "b", "c"], top_k=(1, 5, 10), chunk_size=17, backend=backend)
    for s in range(0, 300, 64):  # batched updates, gallery duplicated once (DDP padding)
        metric.update(g[s : s + 64], g_ids[s : s + 64], g_ds[s : s + 64], gallery=True)
    metric.update(g[:10], g_ids[:10], g_ds[:10], gallery=True)
    for s in range(0, 120, 50):
        metric.update(q[s : s + 50], q_tgt[s : s + 50], q_ds[s : s + 50], gallery=False)
    out = metric.compute()
    for k in (1, 5, 10):
        ref = _brute_force(q, q_tgt, q_ds, g, g_ids, g_ds, k)
        assert out[f"recall_at_{k}"].item() == pytest.approx(ref.mean().item())
        for d, name in enumerate("abc"):
            assert out[f"{name}/recall_at_{k}"].item() == pytest.approx(ref[q_ds == d].mean().item())
            assert out[f"{name}/gallery_size"].item() == (g_ds == d).sum().item()
    assert 0 < out["recall_at_10"] < 1


def test_target_ranks_and_topk_against_full_sort() -> None:
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(257, 8, generator=gen)
    q = torch.randn(33, 8, generator=gen)
    t = torch.randint(0, 257, (33,), generator=gen)
    full = q @ g.T
    ref_rank = (full > full.gather(1, t[:, None])).sum(1)
    assert torch.equal(target_ranks(q, g, t, chunk_size=10), ref_rank)
    s, i = topk(q, g, 7, chunk_size=10)
    ref_s, ref_i = full.topk(7, dim=1)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s)
    fs, fi = topk(q, g, 7, backend="faiss")
    assert torch.equal(fi, ref_i) and torch.allclose(fs, ref_s, atol=1e-5)


def test_stable_id_is_process_independent() -> None:
    import subprocess
    import sys

    # The module file alone, not the datamodules package (whose imports take seconds per process).
    schema = Path(__file__).resolve().parents[4] / "datamodules" / "schema.py"
    code = (f"import importlib.util as u; s = u.spec_from_file_location('schema', {str(schema)!r}); "
            "m = u.module_from_spec(s); import sys; sys.modules['schema'] = m; "
            "s.loader.exec_module(m); print(m.stable_id('p000001'))")
    values = {subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "PYTHONHASHSEED": s},
                             capture_output=True, text=True, check=True).stdout.strip() for s in ("1", "2")}
    assert values == {str(stable_id("p000001"))}
    assert stable_id("p000001") != stable_id("p000002") and 0 <= stable_id("x") < 2**63


def _rank_recall(rank: int, world: int, data: tuple[torch.Tensor, ...]) -> dict[str, float]:
    q, q_tgt, q_ds, g, g_ids, g_ds = data
    metric = RecallAtK(["a", "b", "c"], top_k=(1, 5, 10), chunk_size=33)
    # Uneven shares per rank, as split_by_node gives when shards do not divide evenly.
    g_cut, q_cut = (0, 170, 300), (0, 50, 120)
    metric.update(g[g_cut[rank] : g_cut[rank + 1]], g_ids[g_cut[rank] : g_cut[rank + 1]],
                  g_ds[g_cut[rank] : g_cut[rank + 1]], gallery=True)
    metric.update(q[q_cut[rank] : q_cut[rank + 1]], q_tgt[q_cut[rank] : q_cut[rank + 1]],
                  q_ds[q_cut[rank] : q_cut[rank + 1]], gallery=False)
    return {k: float(v) for k, v in metric.compute().items()}


@pytest.mark.slow
def test_recall_under_two_gloo_processes_equals_one_process(embeddings) -> None:
    from support.gloo import run_gloo

    single = RecallAtK(["a", "b", "c"], top_k=(1, 5, 10))
    q, q_tgt, q_ds, g, g_ids, g_ds = embeddings
    single.update(g, g_ids, g_ds, gallery=True)
    single.update(q, q_tgt, q_ds, gallery=False)
    expected = {k: float(v) for k, v in single.compute().items()}
    results = run_gloo(_rank_recall, 2, embeddings)
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)


@pytest.mark.parametrize("protocol,remove_source", [("all", True), ("queries", False), ("queries", True)])
@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
def test_gallery_protocols_match_brute_force(embeddings, protocol, remove_source, backend) -> None:
    q, q_tgt, q_ds, g, g_ids, g_ds = embeddings
    gen = torch.Generator().manual_seed(7)
    # Sources: gallery products of the query's dataset, often close to the query (as in CIR).
    q_src = torch.stack([g_ids[(g_ds == d).nonzero().flatten()[torch.randint(0, int((g_ds == d).sum()), (1,),
                                                                               generator=gen)]][0] for d in q_ds])
    metric = RecallAtK(["a", "b", "c"], top_k=(1, 5, 10, 50), score_k=(10, 50), gallery_protocol=protocol,
                       remove_source=remove_source, chunk_size=29, backend=backend)
    metric.update(g, g_ids, g_ds, gallery=True)
    metric.update(q, q_tgt, q_ds, gallery=False, source_ids=q_src)
    out = metric.compute()
    refs = {k: _brute_force(q, q_tgt, q_ds, g, g_ids, g_ds, k, q_src, protocol, remove_source)
            for k in (1, 5, 10, 50)}
    for k, ref in refs.items():
        assert out[f"recall_at_{k}"].item() == pytest.approx(ref.mean().item())
        per_ds = [ref[q_ds == d].mean().item() for d in range(3)]
        assert out[f"mean_recall_at_{k}"].item() == pytest.approx(sum(per_ds) / 3)
    assert out["score"].item() == pytest.approx((out["mean_recall_at_10"] + out["mean_recall_at_50"]).item() / 2)
    if protocol == "queries":
        used = set(q_tgt.tolist()) | set(q_src.tolist())
        assert sum(out[f"{n}/gallery_size"].item() for n in "abc") == sum(int(i) in used for i in g_ids)


def test_auto_backend_is_faiss_for_single_vectors_on_the_cpu_and_torch_elsewhere() -> None:
    from lightning_modules.retrieval import resolve_backend

    assert resolve_backend("auto", torch.zeros(2, 8)) == "faiss"
    assert resolve_backend("auto", torch.zeros(2, 5, 8)) == "torch"  # MaxSim multi-vectors
    assert resolve_backend("auto", torch.zeros(2, 8, device="meta")) == "torch"  # not on the host
    assert resolve_backend("torch", torch.zeros(2, 8)) == "torch"


@pytest.mark.parametrize("remove_source", [False, True])
def test_a_dataset_with_no_gallery_product_scores_zero(embeddings, remove_source: bool) -> None:
    """An evaluation cut short (fast_dev_run, limit_val_batches) can leave a dataset's queries
    without any of its gallery: they are misses, and the other datasets score as usual."""
    q, q_tgt, q_ds, g, g_ids, g_ds = embeddings
    keep = g_ds != 2
    metric = RecallAtK(dataset_names=["a", "b", "c"], top_k=(1, 10), remove_source=remove_source,
                       gallery_protocol="queries")
    metric.update(g[keep], g_ids[keep], g_ds[keep], gallery=True)
    metric.update(q, q_tgt, q_ds, gallery=False, source_ids=q_tgt)
    out = metric.compute()
    assert out["c/gallery_size"] == 0 and out["c/recall_at_10"] == 0 and out["c/queries"] == (q_ds == 2).sum()
    expected = _brute_force(q[q_ds == 0], q_tgt[q_ds == 0], q_ds[q_ds == 0], g, g_ids, g_ds, 10,
                            q_src=q_tgt[q_ds == 0], protocol="queries", remove_source=remove_source)
    assert float(out["a/recall_at_10"]) == pytest.approx(float(expected.mean()))


def test_maxsim_search_in_bounded_blocks_matches_the_full_score_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Multi-vector search shrinks its chunks to keep each (query × gallery × V × W) block small; the
    ranks and top-k are those of the full MaxSim matrix computed pair by pair."""
    from lightning_modules.retrieval import search

    gen = torch.Generator().manual_seed(2)
    g = F.normalize(torch.randn(61, 12, 8, generator=gen), dim=-1)
    g[::3, 9:] = torch.nan  # products with fewer vectors
    q = F.normalize(torch.randn(17, 3, 8, generator=gen), dim=-1)
    t = torch.randint(0, 61, (17,), generator=gen)
    full = torch.tensor([[max(float(a @ b) for a in qi for b in gj if not b.isnan().any()) for gj in g] for qi in q])
    monkeypatch.setattr(search, "MAXSIM_BLOCK", 3 * 12 * 5 * 5)  # 5 x 5 products per block
    assert search.block_size(q, g, 4096) == 5 and search.block_size(q[:, 0], g[:, 0], 4096) == 4096
    ref_rank = (full > full.gather(1, t[:, None])).sum(1)
    assert torch.equal(target_ranks(q, g, t), ref_rank)
    s, i = topk(q, g, 4)
    ref_s, ref_i = full.topk(4, dim=1)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, atol=1e-6)


# -- ties, degenerate models, reference lines -------------------------------------------------------

def _pessimistic_ranks(scores: torch.Tensor, target: torch.Tensor,
                       excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Brute force: items other than the target (and the excluded one) scoring at least the target's."""
    n, m = scores.shape
    ranks = []
    for i in range(n):
        t = scores[i, target[i]]
        others = [j for j in range(m) if j != target[i] and (excluded is None or j != excluded[i])]
        ranks.append(sum(bool(scores[i, j] >= t) for j in others))
    return torch.tensor(ranks)


def _constant_and_zero(n: int, dim: int = 8) -> dict[str, torch.Tensor]:
    return {"constant": F.normalize(torch.ones(n, dim), dim=-1), "zero": torch.zeros(n, dim)}


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("kind", ["constant", "zero"])
@pytest.mark.parametrize("remove_source", [False, True])
def test_a_collapsed_model_scores_zero_not_one(backend: str, kind: str, remove_source: bool) -> None:
    """200 queries, 200 products, every embedding equal: every item ties with the target, so the
    target ranks last. The old rule (only strictly higher items count) gave R@1 = R@10 = 1.0."""
    emb = _constant_and_zero(200)[kind]
    ids, ds = torch.arange(200), torch.zeros(200, dtype=torch.long)
    metric = RecallAtK(top_k=(1, 5, 10), backend=backend, remove_source=remove_source)
    metric.update(emb, ids, ds, gallery=True)
    metric.update(emb, ids.roll(1), ds, gallery=False, source_ids=ids)
    out = metric.compute()
    for k in (1, 5, 10):
        assert out[f"recall_at_{k}"] == 0.0 and out[f"text_blind/recall_at_{k}"] == 0.0
    assert out["score"] == 0.0
    assert out["chance/recall_at_10"] == pytest.approx(10 / (199 if remove_source else 200))


def test_a_collapsed_multi_vector_model_scores_zero() -> None:
    g = torch.ones(50, 3, 4)
    g[::2, 2] = torch.nan  # padded views stay allowed
    metric = RecallAtK(top_k=(1, 10))
    metric.update(g, torch.arange(50), torch.zeros(50, dtype=torch.long), gallery=True)
    metric.update(torch.ones(50, 2, 4), torch.arange(50), torch.zeros(50, dtype=torch.long), gallery=False)
    assert metric.compute()["recall_at_10"] == 0.0


@pytest.mark.parametrize("where", ["query", "gallery"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_embeddings_stop_the_evaluation_in_one_line(where: str, value: float) -> None:
    gen = torch.Generator().manual_seed(0)
    g, q = torch.randn(40, 8, generator=gen), torch.randn(30, 8, generator=gen)
    bad = q if where == "query" else g
    bad[3:6, 1] = value
    metric = RecallAtK(dataset_names=["shirts"], label="val")
    metric.update(g, torch.arange(40), torch.zeros(40, dtype=torch.long), gallery=True)
    metric.update(q, torch.arange(30), torch.zeros(30, dtype=torch.long), gallery=False)
    with pytest.raises(NonFiniteEmbeddings) as err:
        metric.compute()
    message = str(err.value)
    assert "\n" not in message and message.startswith("val: 3 of ") and f"{where} embeddings" in message
    assert "'shirts'" in message


def test_a_multi_vector_product_with_no_real_view_is_not_finite() -> None:
    g = torch.randn(10, 3, 4)
    g[4] = torch.nan
    metric = RecallAtK()
    metric.update(g, torch.arange(10), torch.zeros(10, dtype=torch.long), gallery=True)
    metric.update(torch.randn(5, 2, 4), torch.arange(5), torch.zeros(5, dtype=torch.long), gallery=False)
    with pytest.raises(NonFiniteEmbeddings, match="1 of 10 gallery"):
        metric.compute()


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("remove_source", [False, True])
def test_exact_ties_rank_above_the_target_as_brute_force_says(backend: str, remove_source: bool) -> None:
    """Small-integer embeddings make exact ties common; ranks follow the pessimistic brute force."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randint(-1, 2, (60, 3), generator=gen).float()
    q = torch.randint(-1, 2, (80, 3), generator=gen).float()
    tgt, src = torch.randint(0, 60, (80,), generator=gen), torch.randint(0, 60, (80,), generator=gen)
    src[tgt == src] = (src[tgt == src] + 1) % 60
    metric = RecallAtK(top_k=(1, 3, 10), backend=backend, remove_source=remove_source, chunk_size=7)
    metric.update(g, torch.arange(60), torch.zeros(60, dtype=torch.long), gallery=True)
    metric.update(q, tgt, torch.zeros(80, dtype=torch.long), gallery=False, source_ids=src)
    out = metric.compute()
    ref = _pessimistic_ranks(q @ g.T, tgt, src if remove_source else None)
    blind = _pessimistic_ranks(g[src] @ g.T, tgt, src if remove_source else None)
    for k in (1, 3, 10):
        assert out[f"recall_at_{k}"].item() == pytest.approx((ref < k).float().mean().item())
        assert out[f"text_blind/recall_at_{k}"].item() == pytest.approx((blind < k).float().mean().item())
    assert (ref == 0).float().mean() < out["recall_at_10"] < 1  # ties present, not degenerate


@pytest.mark.parametrize("size", [3, 10, 11])
def test_faiss_removing_the_source_from_a_gallery_smaller_than_k(size: int) -> None:
    """A gallery holding at most max(K) products: every list is the whole gallery (was a crash)."""
    gen = torch.Generator().manual_seed(1)
    g = F.normalize(torch.randn(size, 6, generator=gen), dim=-1)
    q = F.normalize(torch.randn(20, 6, generator=gen), dim=-1)
    tgt, src = torch.randint(0, size, (20,), generator=gen), torch.randint(0, size, (20,), generator=gen)
    outs = []
    for backend in ("torch", "faiss"):
        metric = RecallAtK(top_k=(1, 5, 10), backend=backend, remove_source=True)
        metric.update(g, torch.arange(size), torch.zeros(size, dtype=torch.long), gallery=True)
        metric.update(q, tgt, torch.zeros(20, dtype=torch.long), gallery=False, source_ids=src)
        outs.append(metric.compute())
    for key in ("recall_at_1", "recall_at_5", "recall_at_10", "text_blind/recall_at_1"):
        assert outs[0][key] == outs[1][key]


def test_ids_equal_modulo_two_to_the_forty_stay_two_products() -> None:
    """Deduplication keys on the whole (dataset, id) pair: ids 5 and 5 + 2**40 are two products."""
    metric = RecallAtK(top_k=(1,))
    ids = torch.tensor([5, 5 + 2**40, 5])  # the third is a DDP duplicate of the first
    metric.update(torch.eye(3), ids, torch.zeros(3, dtype=torch.long), gallery=True)
    _, g_ids, _ = metric.gallery()
    assert sorted(g_ids.tolist()) == [5, 5 + 2**40]


def test_recall_subset_and_view_incomplete_lines_against_brute_force() -> None:
    gen = torch.Generator().manual_seed(4)
    g = F.normalize(torch.randn(40, 8, generator=gen), dim=-1)
    groups = [list(range(s, s + 5)) for s in range(0, 40, 5)]  # 8 groups of near-duplicates
    tgt = torch.tensor([groups[i % 8][(i * 3) % 5] for i in range(32)])
    src = torch.tensor([groups[i % 8][(i * 3 + 1) % 5] for i in range(32)])
    q = F.normalize(g[tgt] + 0.8 * torch.randn(32, 8, generator=gen), dim=-1)
    subsets = subset_tensor([[m for m in groups[i % 8] if m != int(src[i])] for i in range(32)])
    flags = (torch.arange(32) % 3 == 0).long()
    metric = RecallAtK(top_k=(1, 5), remove_source=True)
    metric.update(g, torch.arange(40), torch.zeros(40, dtype=torch.long), gallery=True)
    metric.update(q, tgt, torch.zeros(32, dtype=torch.long), gallery=False, source_ids=src, subsets=subsets,
                  flags=flags)
    out = metric.compute()
    for name, queries in (("", q), ("text_blind/", g[src])):
        sub = []
        for i in range(32):
            members = [m for m in groups[i % 8] if m != int(src[i])]
            s = queries[i] @ g[members].T
            t = float(queries[i] @ g[tgt[i]])
            sub.append(sum(float(x) >= t for m, x in zip(members, s, strict=True) if m != int(tgt[i])))
        sub_t = torch.tensor(sub)
        for k in (1, 2, 3):
            assert out[f"{name}recall_subset_at_{k}"].item() == pytest.approx((sub_t < k).float().mean().item())
        full = _pessimistic_ranks(queries @ g.T, tgt, src)
        for k in (1, 5):
            want = (full[flags.bool()] < k).float().mean().item()
            assert out[f"view_incomplete/{name}recall_at_{k}"].item() == pytest.approx(want)
    assert out["view_incomplete/queries"] == 11 and out["subset/queries"] == 32
    assert out["text_blind/recall_subset_at_1"] < 0.5 < out["recall_subset_at_1"]


def test_a_dataset_without_text_blind_queries_logs_no_text_blind_line() -> None:
    """Dataset b's sources are not in its gallery: it has no text-blind line (not a made-up 0), and
    the averages over datasets take only the datasets that have one."""
    gen = torch.Generator().manual_seed(5)
    g = F.normalize(torch.randn(20, 4, generator=gen), dim=-1)
    ds = torch.tensor([0] * 10 + [1] * 10)
    metric = RecallAtK(["a", "b"], top_k=(1, 5))
    metric.update(g, torch.arange(20), ds, gallery=True)
    src = torch.tensor([1, 2, 3, 90, 91])  # b's sources 90 and 91 are nowhere
    metric.update(g[[0, 1, 12, 13, 14]], torch.tensor([0, 1, 12, 13, 14]), torch.tensor([0, 0, 1, 1, 1]),
                  gallery=False, source_ids=torch.tensor([src[0], src[1], 90, 91, 92]))
    out = metric.compute()
    assert "b/text_blind/recall_at_5" not in out and "a/text_blind/recall_at_5" in out
    assert out["text_blind/mean_recall_at_5"] == out["a/text_blind/recall_at_5"]
    assert out["text_blind/queries"] == 2


def test_a_dataset_named_like_a_reference_line_is_refused() -> None:
    metric = RecallAtK(["text_blind"])
    metric.update(torch.eye(3), torch.arange(3), torch.zeros(3, dtype=torch.long), gallery=True)
    metric.update(torch.eye(3), torch.arange(3), torch.zeros(3, dtype=torch.long), gallery=False)
    with pytest.raises(ValueError, match="reserved"):
        metric.compute()
