from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules.schema import stable_id
from lightning_modules.retrieval.recall import RecallAtK
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
