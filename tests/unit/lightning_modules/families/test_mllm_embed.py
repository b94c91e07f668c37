"""The zero-shot MLLM embedders: each mechanism checked against a plain recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from lightning_modules import MLLMEmbedder, RetrievalEval
from lightning_modules.backbones import CARDS, VLEmbedderBackbone
from lightning_modules.backbones.vl_embedder import END_OF_TEXT
from lightning_modules.core import Products
from lightning_modules.retrieval.search import similarities

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 60, 200)]


@pytest.fixture(scope="module", params=["qwen3-vl-embedding", "gme"])
def backbone(request: pytest.FixtureRequest) -> VLEmbedderBackbone:
    return VLEmbedderBackbone("tiny", family=request.param).eval()


def views(backbone: VLEmbedderBackbone, colours: list[tuple[int, int, int]], size: tuple[int, int] = (64, 48)):
    return [backbone.image_transform(Image.new("RGB", size, c)) for c in colours]


def single_forward(backbone: VLEmbedderBackbone, seq) -> torch.Tensor:
    """An unpadded forward of one request; every hidden state, float32."""
    inputs = backbone.builder.batch([seq], "cpu")
    with torch.no_grad():
        return backbone(**inputs).last_hidden_state[0].float()


def test_the_pooled_token_is_the_last_one_of_the_request_as_the_card_says(backbone: VLEmbedderBackbone) -> None:
    v = views(backbone, COLOURS[:3])
    short = backbone.request(v[:1], "red", "query")
    long = backbone.request(v, "make it green and add a long zip at the back", "query")
    last = backbone.tokenizer.convert_ids_to_tokens(short.ids[-1])
    if backbone.card.pooled_token:  # GME: <|endoftext|> after the assistant opening
        assert last == END_OF_TEXT
    else:  # Qwen3-VL-Embedding: the assistant opening's own last token
        assert short.ids[-1] != backbone.token_ids[END_OF_TEXT]
        assert backbone.tokenizer.decode(short.ids[-4:]).replace(" ", "").endswith("<|im_start|>assistant")
    # Batched with right padding (the short request padded), each row is its own last hidden state.
    with torch.no_grad():
        batched = backbone.embed([short, long])
    for i, seq in enumerate((short, long)):
        expected = F.normalize(single_forward(backbone, seq)[-1], dim=-1)
        assert torch.allclose(batched[i], expected, atol=1e-5)
        assert not torch.allclose(batched[i], F.normalize(single_forward(backbone, seq)[-2], dim=-1), atol=1e-3)


@pytest.mark.parametrize("card", sorted(CARDS))
def test_instructions_sit_where_each_card_puts_them(card: str) -> None:
    family = "qwen3-vl-embedding" if CARDS[card].architecture == "qwen3-vl" else "gme"
    b = VLEmbedderBackbone("tiny", family=family, card=card)
    c = CARDS[card]
    v = views(b, COLOURS[:1])

    def turns(seq) -> tuple[str, str]:
        text = b.tokenizer.decode(seq.ids)
        system, user = text.split("<|im_start|> user")
        return system, user

    def words(text: str) -> str:
        return " ".join(b.tokenizer.decode(b.text_ids(text)).split())

    q_system, q_user = turns(b.request(v, "make it red", "query"))
    d_system, d_user = turns(b.request(v, role="document"))
    if c.instruction_in == "system":
        assert words(c.query_instruction) in q_system and words(c.document_instruction) in d_system
        assert words(c.query_instruction) not in q_user
    else:  # RzenEmbed: fixed system text, the instruction before the user's text, after the images
        assert words(c.system_text) in q_system and words(c.system_text) in d_system
        assert words(c.query_instruction + " make it red") in q_user.split("<|vision_end|>")[-1]
        assert words(c.document_instruction) in d_user
    # An instruction given in the config replaces the card's.
    custom = b.request(v, "make it red", "query", instruction="find the product")
    assert words("find the product") in b.tokenizer.decode(custom.ids)
    assert words(c.query_instruction) not in b.tokenizer.decode(custom.ids)


def test_the_instruction_changes_the_embedding(backbone: VLEmbedderBackbone) -> None:
    v = views(backbone, COLOURS[:2])
    with torch.no_grad():
        a, b = backbone.embed([backbone.request(v, "make it red", "query"),
                               backbone.request(v, "make it red", "query", instruction="represent the user's input.")])
    assert not torch.allclose(a, b, atol=1e-4)


def test_token_budget_splits_batches_without_changing_embeddings(backbone: VLEmbedderBackbone) -> None:
    v = views(backbone, COLOURS)
    seqs = [backbone.request(v[: 1 + i % 4], "make it " + "very " * i + "red", "query") for i in range(7)]
    with torch.no_grad():
        whole = backbone.embed(seqs)
    shapes: list[tuple[int, int]] = []
    hook = backbone.model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    budget = max(len(s.ids) for s in seqs) * 2
    backbone.max_batch_tokens = budget
    try:
        with torch.no_grad():
            split = backbone.embed(seqs)
    finally:
        backbone.max_batch_tokens = 16384
        hook.remove()
    assert len(shapes) >= 4 and sum(n for n, _ in shapes) == len(seqs)
    assert all(n * length <= budget for n, length in shapes)
    assert torch.allclose(whole, split, atol=1e-5)


def batch_of(backbone: VLEmbedderBackbone) -> tuple[dict, Products]:
    sources = [views(backbone, COLOURS[:3]), views(backbone, COLOURS[3:4]), views(backbone, COLOURS[4:6])]
    targets = [views(backbone, COLOURS[1:3]), views(backbone, COLOURS[5:6]), views(backbone, COLOURS[:4])]
    texts = ["make it red", "add a hood", "shorter sleeves"]
    return {"source_images": sources, "text": texts}, Products(targets)


def per_view(backbone: VLEmbedderBackbone, products, texts, role) -> list[torch.Tensor]:
    """Each view embedded alone, one request at a time: the reference for MeanPool and MaxSim."""
    with torch.no_grad():
        return [torch.cat([backbone.embed([backbone.request([view], t, role)]) for view in views])
                for views, t in zip(products, texts, strict=True)]


def test_meanpool_and_maxsim_are_the_papers_equations(backbone: VLEmbedderBackbone) -> None:
    batch, targets = batch_of(backbone)
    q_views = per_view(backbone, batch["source_images"], batch["text"], "query")
    d_views = per_view(backbone, targets.images, [""] * 3, "document")
    scores = {}
    for strategy in ("meanpool", "maxsim"):
        model = MLLMEmbedder(backbone, view_strategy=strategy).eval()
        with torch.no_grad():
            scores[strategy] = similarities(model.encode_query(batch), model.encode_target(targets))
    for i, q in enumerate(q_views):
        for j, d in enumerate(d_views):
            mean_q, mean_d = F.normalize(q.mean(0), dim=-1), F.normalize(d.mean(0), dim=-1)
            assert scores["meanpool"][i, j] == pytest.approx(float(mean_q @ mean_d), abs=1e-5)  # eq. 15
            assert scores["maxsim"][i, j] == pytest.approx(float((q @ d.T).max()), abs=1e-5)  # eq. 16
    # Joint (eq. 14): one request holding every view and the text.
    joint = MLLMEmbedder(backbone, view_strategy="joint").eval()
    with torch.no_grad():
        q = joint.encode_query(batch)
        expected = backbone.embed([backbone.request(batch["source_images"][1], "add a hood", "query")])
    assert q.shape == (3, 64) and torch.allclose(q[1], expected[0], atol=1e-5)


def test_training_step_is_joint_and_has_gradients(backbone: VLEmbedderBackbone) -> None:
    model = MLLMEmbedder(VLEmbedderBackbone("tiny", family=backbone.family), view_strategy="maxsim").train()
    batch, targets = batch_of(model.backbone)
    batch = {**batch, "target_images": targets.images, "meta": [{}] * 3}
    pair = model.embed_pair(batch)
    assert pair.query.shape == pair.target.shape == (3, 64)  # joint in training, whatever evaluation does
    model.training_terms(pair, batch)["loss"].backward()
    assert model.backbone.model.visual.patch_embed.proj.weight.grad is not None


def test_maxsim_refuses_the_faiss_backend(backbone: VLEmbedderBackbone) -> None:
    with pytest.raises(ValueError, match="evaluation.backend=torch"):
        MLLMEmbedder(backbone, view_strategy="maxsim", evaluation=RetrievalEval(backend="faiss"))


def test_save_and_load_by_path_and_the_legacy_gme_layout(backbone: VLEmbedderBackbone, tmp_path: Path) -> None:
    backbone.save_pretrained(tmp_path / "saved")
    loaded = VLEmbedderBackbone(str(tmp_path / "saved"), family=backbone.family, min_pixels=28 * 28,
                                max_pixels=128 * 128).eval()
    seq = backbone.request(views(backbone, COLOURS[:2]), "make it red", "query")
    assert loaded.request(views(loaded, COLOURS[:2]), "make it red", "query").ids == seq.ids
    with torch.no_grad():
        assert torch.allclose(backbone.embed([seq]), loaded.embed([seq]), atol=1e-5)
    if backbone.family != "gme":
        return
    # GME's hub checkpoints predate the language_model/visual split of the weights' names.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in (tmp_path / "saved").iterdir():
        if f.name != "model.safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    renamed = {("model." + k.removeprefix("language_model.")) if k.startswith("language_model.") else k: v
               for k, v in load_file(tmp_path / "saved/model.safetensors").items()}
    assert any(k.startswith("visual.") for k in renamed) and any(k.startswith("model.layers.") for k in renamed)
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((legacy / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (legacy / "config.json").write_text(json.dumps(config))
    old = VLEmbedderBackbone(str(legacy), family="gme", min_pixels=28 * 28, max_pixels=128 * 128).eval()
    with torch.no_grad():
        assert torch.allclose(backbone.embed([seq]), old.embed([seq]), atol=1e-5)
