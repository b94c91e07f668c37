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

from cir.mine import embed_queries
from datamodules.schema import stable_id
from lightning_modules.retrieval import similarities


def two_text_agreement(module: L.LightningModule, dm: Any) -> tuple[float, int]:
    """(share of pairs where each text's query scores its own target above the other's, pairs)."""
    was_training = module.training
    module.eval()
    emb, rows = embed_queries(module, dm, dm.hparams.val_split, module.device, batch_size=64, workers=0)
    module.train(was_training)
    assert module.last_gallery is not None, "run an evaluation first: the gallery embeddings come from it"
    g_emb, g_ids, _ = (t.cpu() for t in module.last_gallery)
    row = {int(i): n for n, i in enumerate(g_ids.tolist())}
    by_source: dict[tuple[str, str], list[int]] = defaultdict(list)
    for n, r in enumerate(rows):
        by_source[(r["dataset"], r["source_id"])].append(n)
    agree = total = 0
    for members in by_source.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1:]:
                ta, tb = (row.get(stable_id(rows[x]["target_id"])) for x in (a, b))
                if ta is None or tb is None or ta == tb:
                    continue
                s = similarities(torch.stack([emb[a], emb[b]]), g_emb[[ta, tb]])
                agree += bool(s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0])
                total += 1
    return (agree / total if total else float("nan")), total
