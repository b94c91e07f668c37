"""ProCIR on multi-turn sessions: one dialogue per session, read at every turn's ``<emb_all>``.

Checked against independent computations on the tiny Qwen3.5: the forward's ids are the session
dialogue's (its first turn token for token the single-turn query), q and s are the hidden states at
the even and odd ``<emb_all>`` tokens, L_cir is InfoNCE of every turn's q against that turn's target
document, and sessions batched together read what each reads alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from support.procir import model, sym_infonce, tokens, views

from datamodules.session_batches import flatten_sessions
from lightning_modules import Products
from lightning_modules.backbones.qwen import EMB_TOKEN, IMAGE_PAD, QwenBackbone
from lightning_modules.families.procir.dialogue import Turn

TEXTS = ["make it red", "add long sleeves", "add a pocket"]


def _sessions(backbone: QwenBackbone, lengths: list[int]) -> tuple[dict[str, Any], list[list[list[Any]]]]:
    """Flattened session batch of ``lengths`` turns each; also every session's chain views."""
    chains = [[views(backbone, 1 + (s + k) % 3, 100 * s + k) for k in range(n + 1)] for s, n in enumerate(lengths)]
    ids = [[f"s{s}p{k}" for k in range(n + 1)] for s, n in enumerate(lengths)]
    meta = [[{"product_id": p, "dataset": "gen", "short_caption": f"product {p}",
              "long_caption": f"a long caption of product {p}"} for p in chain] for chain in ids]
    turns = [[{"source_id": a, "target_id": b, "dataset": "gen", "modification_short": TEXTS[t]}
              for t, (a, b) in enumerate(zip(chain, chain[1:], strict=False))] for chain in ids]
    batch = flatten_sessions({"session_id": [f"s{s}" for s in range(len(lengths))], "products": chains,
                              "texts": [[t["modification_short"] for t in ts] for ts in turns], "turns": turns,
                              "chain_meta": meta})
    return batch, chains


class Spy:
    """The backbone's inputs and last hidden states, per forward."""

    def __init__(self, backbone: QwenBackbone) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = backbone.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        self.calls.append((kwargs["input_ids"].detach().clone(), output.last_hidden_state.detach().clone()))


def test_a_3_turn_session_is_one_dialogue_with_a_loss_at_every_turn(backbone: QwenBackbone) -> None:
    m = model(backbone, align=False)
    batch, chains = _sessions(backbone, [3])
    spy = Spy(backbone)
    try:
        with torch.no_grad():
            pair = m.embed_pair(batch)
            terms = m.training_terms(pair, batch)
    finally:
        spy.handle.remove()
    ids, hidden = spy.calls[0]  # the session's forward comes first, then the target documents
    assert ids.shape[0] == 1  # one dialogue for the three turns
    expected, _ = m.dialogues.session([Turn(t, v) for t, v in zip(TEXTS, chains[0], strict=False)])
    assert ids[0, : len(expected.ids)].tolist() == expected.ids
    toks = tokens(backbone, expected)
    # Three turns of two <emb_all> each (s, then q); every reference's views, p0, p1, p2, once.
    assert toks.count(EMB_TOKEN) == 6
    assert toks.count(IMAGE_PAD) == sum(backbone.image_tokens(v) for chain in chains[0][:3] for v in chain)
    assert [toks.index(w) < toks.index(x) for w, x in (("red", "sleeves"), ("sleeves", "pocket"))] == [True, True]
    # Its first turn is token for token the single-turn (two-stage) query of p0 and text 1.
    single = m.query(chains[0][0], TEXTS[0])
    assert expected.ids[: len(single.ids)] == single.ids
    # Which positions carry the loss: q at <emb_all> 2, 4, 6, s at 1, 3, 5.
    emb_at = (ids[0] == backbone.token_ids[EMB_TOKEN]).nonzero().flatten()
    assert emb_at.tolist() == expected.emb_positions
    assert torch.allclose(pair.query, F.normalize(hidden[0, emb_at[1::2]], dim=-1), atol=1e-6)
    assert torch.allclose(pair.extras["source"], F.normalize(hidden[0, emb_at[0::2]], dim=-1), atol=1e-6)
    # L_cir: every turn's q against that turn's target document (p1, p2, p3).
    with torch.no_grad():
        docs = m.encode_target(Products(chains[0][1:]))
    assert torch.allclose(pair.target, docs, atol=1e-5)
    assert terms["cir"] == pytest.approx(float(sym_infonce(pair.query, docs)), abs=1e-4)
    assert set(terms) == {"loss", "cir"}


def test_turn_1_is_the_single_turn_query_and_later_turns_read_the_history(backbone: QwenBackbone) -> None:
    m = model(backbone)
    batch, _ = _sessions(backbone, [3])
    with torch.no_grad():
        session = m.encode_session(batch)
        single = m.encode_query(batch)  # each row alone: reference p_t and text_t
        s = m.embed_pair(batch).extras["source"]
        gallery = m.encode_target(Products(batch["source_images"]))
    assert torch.allclose(session[0], single[0], atol=1e-5)
    assert not torch.allclose(session[1:], single[1:], atol=1e-3)
    # Turn 1's s is by causality p0's gallery embedding; later turns' s read the dialogue before them.
    assert torch.allclose(s[0], gallery[0], atol=1e-5) and not torch.allclose(s[1:], gallery[1:], atol=1e-3)


def test_sessions_batched_together_read_what_each_reads_alone(backbone: QwenBackbone) -> None:
    m = model(backbone)
    batch, _ = _sessions(backbone, [2, 3, 1])
    rows = {s: [i for i, x in enumerate(batch["session_index"]) if x == s] for s in range(3)}
    with torch.no_grad():
        together = m.encode_session(batch)
        for index in rows.values():
            alone = m.encode_session({k: [v[i] for i in index] if isinstance(v, list) else v[index]
                                      for k, v in batch.items()})
            assert torch.allclose(together[index], alone, atol=1e-5)
    assert batch["turn_index"] == [0, 1, 0, 1, 2, 0] and batch["target_id"][2:5] == ["s1p1", "s1p2", "s1p3"]


def test_align_terms_at_every_turn(backbone: QwenBackbone) -> None:
    m = model(backbone)
    batch, _ = _sessions(backbone, [2, 3])
    with torch.no_grad():
        pair = m.embed_pair(batch)
        terms = m.training_terms(pair, batch)
        kind = "long" if m.sample_rng("caption_kind").random() < 0.5 else "short"
        t_tgt = m.embed_texts([x["target"][f"{kind}_caption"] for x in batch["meta"]])
        t_src = m.embed_texts([x["source"][f"{kind}_caption"] for x in batch["meta"]])
    assert len(pair.query) == 5
    assert terms["doc"] == pytest.approx(float(sym_infonce(pair.target, t_tgt)), abs=1e-4)
    assert terms["src"] == pytest.approx(float(sym_infonce(pair.extras["source"], t_src)), abs=1e-4)


def test_per_view_strategies_take_each_turn_as_a_single_turn_query(backbone: QwenBackbone) -> None:
    m = model(backbone, view_strategy="meanpool")
    batch, _ = _sessions(backbone, [2])
    with torch.no_grad():
        assert torch.allclose(m.encode_session(batch), m.encode_query(batch))


def test_grad_cache_is_refused_on_sessions(backbone: QwenBackbone) -> None:
    m = model(backbone, grad_cache_chunk=2)
    batch, _ = _sessions(backbone, [2])
    with pytest.raises(ValueError, match="grad_cache_chunk"):
        m.embed_pair(batch)
