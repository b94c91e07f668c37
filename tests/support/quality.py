"""What the training-quality tests measure besides Recall@K: whether the same source with two
different texts retrieves each text's own target.

A model that ignores the text gives both queries of a pair one embedding, so it can order the two
targets one way only: it never satisfies both texts (0 %), and a random scorer does a quarter of
the time. The pairs are every two val triplets with the same source and different targets.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning as L
import torch

from datamodules.schema import stable_id
from lightning_modules.retrieval import similarities


@torch.no_grad()
def query_embeddings(module: L.LightningModule, dm: Any) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """The model's embedding of every val query (short text, as evaluation) and its triplet."""
    _, queries = dm.val_dataloader()
    was_training = module.training
    module.eval()
    out, triplets = [], []
    for batch in queries:
        batch = module.transfer_batch_to_device(batch, module.device, 0)
        out.append(module.encode_query(batch).float().cpu())
        triplets += [{"source": s, "target": t, "dataset": d}
                     for s, t, d in zip(batch["source_id"], batch["target_id"], batch["dataset"], strict=True)]
    module.train(was_training)
    return torch.cat(out), triplets


def two_text_agreement(module: L.LightningModule, dm: Any) -> tuple[float, int]:
    """(share of pairs where each text's query scores its own target above the other's, pairs)."""
    emb, triplets = query_embeddings(module, dm)
    assert module.last_gallery is not None, "run an evaluation first: the gallery embeddings come from it"
    g_emb, g_ids, _ = (t.cpu() for t in module.last_gallery)
    row = {int(i): n for n, i in enumerate(g_ids.tolist())}
    by_source: dict[tuple[str, str], list[int]] = defaultdict(list)
    for n, t in enumerate(triplets):
        by_source[(t["dataset"], t["source"])].append(n)
    agree = total = 0
    for members in by_source.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1:]:
                ta, tb = (row.get(stable_id(triplets[x]["target"])) for x in (a, b))
                if ta is None or tb is None or ta == tb:
                    continue
                s = similarities(torch.stack([emb[a], emb[b]]), g_emb[[ta, tb]])
                agree += bool(s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0])
                total += 1
    return (agree / total if total else float("nan")), total
