"""Per-turn Recall@K of sessions: every turn's recall and text-blind line equal a brute-force ranking
of the embeddings (ties never to the target, the turn's reference removed), and the per-turn keys
are logged beside the single-turn ones without mixing into them."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from datamodules.session_batches import flatten_sessions
from lightning_modules.components.infonce import SymmetricInfoNCE
from lightning_modules.core import Products, RetrievalEval, RetrievalModule

D = 6
KS = (1, 2, 5)


class Lookup(RetrievalModule):
    """A product's "views" are its embedding; a query is its reference's plus a vector of its text.
    Small integer vectors: every score is exact, so ties are ties whatever the summation order."""

    def __init__(self, evaluation: RetrievalEval) -> None:
        super().__init__(loss=SymmetricInfoNCE(), evaluation=evaluation)

    @staticmethod
    def text_vector(text: str) -> torch.Tensor:
        return torch.randint(-2, 3, (D,), generator=torch.Generator().manual_seed(sum(map(ord, text)))).float()

    def encode_target(self, products: Products) -> torch.Tensor:
        return products.images[:, 0]

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["source_images"][:, 0] + torch.stack([self.text_vector(t) for t in batch["text"]])


def _world(seed: int) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    rng = random.Random(seed)
    ids = [f"p{i}" for i in range(14)]
    emb = {p: torch.randint(-3, 4, (D,), generator=torch.Generator().manual_seed(seed * 100 + i)).float()
           for i, p in enumerate(ids)}
    emb["p13"] = emb["p12"].clone()  # a tie: whichever of the two is the target, the other ranks above it
    chains = []
    for _ in range(5):
        chains.append(rng.sample(ids, rng.choice([2, 3, 4])))  # 1 to 3 turns
    return emb, chains


def _session_batch(emb: dict[str, torch.Tensor], chains: list[list[str]]) -> dict[str, Any]:
    products = [[emb[p][None] for p in chain] for chain in chains]
    turns = [[{"source_id": a, "target_id": b, "dataset": "gen", "modification_short": f"{a} to {b}"}
              for a, b in zip(chain, chain[1:], strict=False)] for chain in chains]
    return flatten_sessions({"session_id": [f"s{i}" for i in range(len(chains))], "products": products,
                             "texts": [[t["modification_short"] for t in ts] for ts in turns], "turns": turns,
                             "chain_meta": [[{"product_id": p, "dataset": "gen"} for p in chain] for chain in chains]})


def _brute_force(queries: torch.Tensor, targets: list[str], sources: list[str], emb: dict[str, torch.Tensor],
                 k: int, remove_source: bool) -> float:
    hits = []
    for q, target, source in zip(queries, targets, sources, strict=True):
        gallery = [p for p in emb if not (remove_source and p == source)]
        if target not in gallery:
            hits.append(False)
            continue
        score = float(q @ emb[target])
        above = sum(1 for p in gallery if p != target and float(q @ emb[p]) >= score)  # ties rank above
        hits.append(above < k)
    return sum(hits) / len(hits)


@pytest.mark.parametrize(("seed", "remove_source"), [(0, True), (1, True), (2, False)])
def test_per_turn_recall_equals_brute_force(seed: int, remove_source: bool) -> None:
    emb, chains = _world(seed)
    model = Lookup(RetrievalEval(top_k=KS, remove_source=remove_source)).eval()
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    gallery = {"images": torch.stack(list(emb.values()))[:, None], "mask": torch.ones(len(emb), 1, dtype=torch.bool),
               "product_id": list(emb), "dataset": ["gen"] * len(emb), "meta": [{}] * len(emb)}
    batch = _session_batch(emb, chains)
    with torch.no_grad():
        model.validation_step(gallery, 0, dataloader_idx=0)
        # Single-turn queries too, so the per-turn lines are checked not to leak into the pooled ones.
        model.validation_step({k: v[:1] for k, v in batch.items() if k not in ("session_index",)}, 0, 1)
        for start in range(0, len(batch["text"]), 4):  # several batches, split inside sessions
            model.validation_step({k: v[start:start + 4] for k, v in batch.items()}, 0, dataloader_idx=2)
        queries = model.encode_query(batch)
        model.on_validation_epoch_end()
    turns = torch.tensor(batch["turn_index"])
    for t in sorted(set(batch["turn_index"])):
        rows = (turns == t).nonzero().flatten().tolist()
        targets = [batch["target_id"][r] for r in rows]
        sources = [batch["source_id"][r] for r in rows]
        assert logged[f"val/turn_{t + 1}/queries"] == len(rows)
        for k in KS:
            expected = _brute_force(queries[rows], targets, sources, emb, k, remove_source)
            blind = _brute_force(torch.stack([emb[s] for s in sources]), targets, sources, emb, k, remove_source)
            assert logged[f"val/turn_{t + 1}/recall_at_{k}"] == pytest.approx(expected)
            assert logged[f"val/turn_{t + 1}/text_blind/recall_at_{k}"] == pytest.approx(blind)
            pool = len(emb) - (1 if remove_source else 0)
            assert logged[f"val/turn_{t + 1}/chance/recall_at_{k}"] == pytest.approx(min(1.0, k / pool))
    # The pooled single-turn numbers are the one single-turn query's alone.
    assert logged["val/gen/queries"] == 1
    assert not model.session_recall["val"].update_called  # reset for the next evaluation


def test_turn_1_of_a_history_blind_family_is_its_single_turn_query() -> None:
    emb, chains = _world(3)
    model = Lookup(RetrievalEval()).eval()
    batch = _session_batch(emb, chains)
    assert torch.equal(model.encode_session(batch), model.encode_query(batch))


def test_a_dataset_named_like_a_turn_is_refused() -> None:
    from lightning_modules.retrieval.recall import RecallAtK

    metric = RecallAtK(dataset_names=["turn_1"])
    metric.update(torch.eye(2), torch.tensor([1, 2]), torch.tensor([0, 0]), gallery=True)
    metric.update(torch.eye(2), torch.tensor([1, 2]), torch.tensor([0, 0]), gallery=False)
    with pytest.raises(ValueError, match="reserved"):
        metric.compute()
