"""ProCIR: each mechanism checked against an independent computation, on the tiny Qwen3.5."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support.procir import model, product_images, sym_infonce, tokens, views

from lightning_modules import ProCIR, Products
from lightning_modules.backbones.qwen import EMB_TOKEN, IMAGE_PAD, THINK, THINK_END, QwenBackbone
from lightning_modules.backbones.qwen_chat import Dialogue
from lightning_modules.families.procir.dialogue import keep_tokens
from lightning_modules.retrieval.recall import RecallAtK


def test_images_keep_aspect_within_the_pixel_range(backbone: QwenBackbone) -> None:
    small = backbone.image_transform(Image.new("RGB", (40, 80)))
    big = backbone.image_transform(Image.new("RGB", (2000, 1000)))
    patch = 16
    for img, ratio in ((small, 0.5), (big, 2.0)):
        t, h, w = img.grid_thw.tolist()
        assert 128 * 128 <= h * w * patch * patch <= 512 * 512
        assert w / h == pytest.approx(ratio, rel=0.2)
        assert img.pixel_values.shape[0] == t * h * w


def test_dialogues_have_the_papers_format(backbone: QwenBackbone) -> None:
    m = model(backbone)
    v = views(backbone, 3, 0)
    doc = tokens(backbone, m.document(v))
    mt = tokens(backbone, m.query(v, "make it red"))
    single = tokens(backbone, model(backbone, two_stage_dialogue=False).query(v, "make it red"))
    assert "system" not in doc and "system" not in mt  # no system prompt
    assert doc.count(IMAGE_PAD) == sum(backbone.image_tokens(x) for x in v)
    # Documents and turn 1 end in an empty think block, then <emb_all>.
    assert doc[-3:] == [THINK, THINK_END, EMB_TOKEN]
    assert mt[: len(doc)] == doc  # turn 1 is token for token a document
    assert mt.count(EMB_TOKEN) == 2 and single.count(EMB_TOKEN) == 1
    turn2 = mt[len(doc):]
    assert "make" in turn2 and IMAGE_PAD not in turn2 and turn2[-3:] == [THINK, THINK_END, EMB_TOKEN]
    assert single.index("make") < single.index("assistant")  # text in the user turn with the images


def test_embedding_is_the_hidden_state_at_emb_all(backbone: QwenBackbone) -> None:
    m = model(backbone)
    seq = m.document(views(backbone, 2, 1))
    inputs = m.dialogue.batch([seq], "cpu")
    inputs.pop("labels")
    with torch.no_grad():
        hidden = backbone(**inputs).last_hidden_state[0]
        emb = m.dialogue.embed([seq], "cpu")[0][0]
    pos = inputs["input_ids"][0].tolist().index(backbone.token_ids[EMB_TOKEN])
    assert torch.equal(emb, hidden[pos])
    assert not torch.allclose(emb, hidden[pos - 1])
    # Padding after it (a longer sequence in the batch) does not change it.
    longer = m.query(views(backbone, 4, 2), "a long text " * 10)
    with torch.no_grad():
        padded = m.dialogue.embed([seq, m.document(views(backbone, 4, 2))], "cpu")[0][0]
        assert len(longer.ids) > len(seq.ids)
    assert torch.allclose(emb, padded, atol=1e-5)


def test_source_embedding_equals_the_gallery_embedding(backbone: QwenBackbone) -> None:
    m = model(backbone, align=False)  # no captions in this batch
    src = [views(backbone, 3, 3), views(backbone, 2, 4)]
    batch = {"source_images": src, "target_images": src, "text": ["make it red", "add long sleeves and a pocket"]}
    with torch.no_grad():
        s = m.embed_pair(batch).extras["source"]
        gallery = m.encode_target(Products(src))
    assert torch.allclose(s, gallery, atol=1e-5)


def test_emb_all_is_added_and_the_embeddings_resized(tmp_path: Path) -> None:
    from transformers import Qwen3_5ForConditionalGeneration

    from lightning_modules.backbones.qwen import CHAT_TOKENS, build_config
    from lightning_modules.backbones.registry import get_preset
    from lightning_modules.backbones.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(["red", "dress"], extra_special_tokens=[t for t in CHAT_TOKENS if t != EMB_TOKEN],
                               add_bos_eos=False, single_punctuation=True)
    qwen = Qwen3_5ForConditionalGeneration(build_config(get_preset("qwen3.5", "tiny").config, tok))
    qwen.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    QwenBackbone("tiny").processor.save_pretrained(tmp_path)
    assert EMB_TOKEN not in tok.get_vocab()
    loaded = QwenBackbone(str(tmp_path))
    emb_id = loaded.token_ids[EMB_TOKEN]
    assert emb_id == len(tok) and loaded.model.get_input_embeddings().weight.shape[0] == len(tok) + 1
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.text_ids(f"red {EMB_TOKEN}")) == ["red", EMB_TOKEN]


def test_saved_tiny_loads_by_path_to_the_same_embeddings(backbone: QwenBackbone, tmp_path: Path) -> None:
    backbone.save_pretrained(tmp_path / "qwen")
    loaded = QwenBackbone(str(tmp_path / "qwen")).eval()
    v = views(backbone, 2, 5)
    with torch.no_grad():
        a = model(backbone).encode_target(Products([v]))
        b = model(loaded).encode_target(Products([[loaded.image_transform(i) for i in product_images(2, 5)]]))
    assert torch.allclose(a, b, atol=1e-5)


def test_loss_terms_follow_the_mechanisms(backbone: QwenBackbone) -> None:
    src, tgt = [views(backbone, 2, 10 + i) for i in range(3)], [views(backbone, 3, 20 + i) for i in range(3)]
    meta = [{"source": {"long_caption": f"a long red dress number {i}", "short_caption": f"red dress {i}"},
             "target": {"long_caption": f"a long blue skirt number {i}", "short_caption": f"blue skirt {i}"}}
            for i in range(3)]
    seen = {}
    for mt, align in ((False, False), (True, False), (False, True), (True, True)):
        m = model(backbone, two_stage_dialogue=mt, align=align)
        batch = {"source_images": src, "target_images": tgt, "text": ["make it blue"] * 3, "meta": meta}
        with torch.no_grad():
            pair = m.embed_pair(batch)
            q, d = pair.query, pair.target
            terms = m.training_terms(pair, batch)
        seen[(mt, align)] = set(terms) - {"loss"}
        assert terms["cir"] == pytest.approx(float(sym_infonce(q, d)), abs=1e-4)
        if align:
            kind = "long" if m.sample_rng("caption_kind").random() < 0.5 else "short"
            with torch.no_grad():
                t_tgt = m.embed_texts([x["target"][f"{kind}_caption"] for x in meta])
            assert terms["doc"] == pytest.approx(float(sym_infonce(d, t_tgt)), abs=1e-4)
            expected = terms["cir"] + 0.25 * terms["doc"] + 0.25 * terms.get("src", 0.0)
            assert terms["loss"] == pytest.approx(float(expected), abs=1e-5)
            if mt:
                with torch.no_grad():
                    t_src = m.embed_texts([x["source"][f"{kind}_caption"] for x in meta])
                assert terms["src"] == pytest.approx(float(sym_infonce(pair.extras["source"], t_src)), abs=1e-4)
    assert seen == {(False, False): {"cir"}, (True, False): {"cir"}, (False, True): {"cir", "doc"},
                    (True, True): {"cir", "doc", "src"}}  # L_src only with MT + Align


def test_keep_tokens_keeps_the_ceiling_in_order() -> None:
    ids = list(range(100, 137))
    for ratio in (1.0, 0.5, 0.26, 0.01, 0.0):
        kept = keep_tokens(ids, ratio, random.Random(1))
        assert len(kept) == math.ceil(ratio * len(ids)) and kept == sorted(kept) and set(kept) <= set(ids)


def test_cot_caption_only_in_training_and_shrinking(backbone: QwenBackbone) -> None:
    m = ProCIR(backbone, cot=True)
    caption = "a long red dress with a round neck and long sleeves and a pocket on the left side"
    n = len(backbone.text_ids(caption))
    v = views(backbone, 2, 30)

    def thought(seq: Dialogue) -> list[str]:
        toks = tokens(backbone, seq)
        return toks[toks.index(THINK) + 1: toks.index(THINK_END)]

    m.train()
    for ratio in (1.0, 0.5, 0.0):
        m.cot_keep_ratio = ratio
        for seq in (m.document(v, {"long_caption": caption}), m.query(v, "make it blue", {"long_caption": caption})):
            assert len(thought(seq)) == math.ceil(ratio * n)
        turn2 = tokens(backbone, m.query(v, "make it blue", {"long_caption": caption}))
        assert turn2[turn2.index(EMB_TOKEN):].count(THINK_END) == 1  # turn 2 never gets the caption
    m.eval()
    m.cot_keep_ratio = 1.0
    assert thought(m.document(v, {"long_caption": caption})) == []
    assert thought(ProCIR(backbone, cot=False).train().document(v, {"long_caption": caption})) == []


def test_meanpool_and_maxsim_against_per_view_embeddings(backbone: QwenBackbone) -> None:
    products = [views(backbone, k, 40 + k) for k in (1, 3, 2)]
    joint = model(backbone)
    with torch.no_grad():
        per_view = [F.normalize(joint.encode_target(Products([[v] for v in p])), dim=-1) for p in products]
        mean = model(backbone, view_strategy="meanpool").encode_target(Products(products))
        multi = model(backbone, view_strategy="maxsim").encode_target(Products(products))
    for i, p in enumerate(per_view):
        assert torch.allclose(mean[i], F.normalize(p.mean(0), dim=-1), atol=1e-5)
        assert torch.allclose(multi[i, : len(p)], p, atol=1e-5) and multi[i, len(p):].isnan().all()
    assert multi.shape[1] == 5  # padded to MAX_VIEWS: batches with different view counts concatenate
    # MaxSim Recall@K against brute-force max over view pairs.
    metric = RecallAtK(top_k=(1, 2))
    ids = torch.arange(3)
    metric.update(multi, ids, torch.zeros(3, dtype=torch.long), gallery=True)
    metric.update(multi.flip(0), ids.flip(0), torch.zeros(3, dtype=torch.long), gallery=False)
    brute = torch.tensor([[max(float(a @ b) for a in per_view[i] for b in per_view[j]) for j in range(3)]
                          for i in range(3)])
    ranks = [(brute[i] > brute[i, i]).sum().item() for i in range(3)]
    out = metric.compute()
    assert float(out["recall_at_1"]) == pytest.approx(sum(r < 1 for r in ranks) / 3)
    assert float(out["recall_at_2"]) == pytest.approx(sum(r < 2 for r in ranks) / 3)


