from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_modules.backbones import PRESETS, CLIPBackbone, QwenBackbone, get_preset


def check_qwen_preset(name: str) -> None:
    from transformers import Qwen3_5ForConditionalGeneration

    from lightning_modules.backbones.qwen import build_config, tiny_tokenizer

    preset = get_preset("qwen3.5", name)
    if not preset.random_init:
        assert re.fullmatch(r"[\w\-.]+/[\w\-.]+", preset.hub_id)
        with pytest.raises(OSError, match="save_pretrained"):
            QwenBackbone(name)
        return
    text = preset.config["text"]
    assert {"linear_attention", "full_attention"} <= set(
        text.get("layer_types") or build_config(preset.config, tiny_tokenizer()).text_config.layer_types)
    if name == "tiny":
        backbone = QwenBackbone(name)
        assert text["num_hidden_layers"] == 2 and 32 <= text["hidden_size"] <= 64 and backbone.dim == 64
        assert sum(p.numel() for p in backbone.parameters()) < 1_000_000
        return
    # The 0.8B architecture on the meta device: its size without allocating it.
    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(build_config(preset.config, tiny_tokenizer()))
    n = sum(p.numel() for p in model.parameters())
    assert 0.7e9 < n < 1.0e9, n
    layers = model.config.text_config.layer_types
    assert len(layers) == 24 and layers[:4] == ["linear_attention"] * 3 + ["full_attention"]


def check_embedder_preset(family: str, name: str) -> None:
    from lightning_modules.backbones.vl_embedder import CARDS, VLEmbedderBackbone, build_config, tiny_tokenizer

    preset = get_preset(family, name)
    card = CARDS[preset.card]
    assert card.architecture == {"qwen3-vl-embedding": "qwen3-vl", "gme": "qwen2-vl"}[family]
    if not preset.random_init:
        assert re.fullmatch(r"[\w\-.]+/[\w\-.]+", preset.hub_id)
        with pytest.raises(OSError, match="save_pretrained"):
            VLEmbedderBackbone(name, family=family)
        return
    if name == "tiny":
        backbone = VLEmbedderBackbone(name, family=family).eval()
        assert backbone.dim == 64 and sum(p.numel() for p in backbone.parameters()) < 1_000_000
        view = backbone.image_transform(Image.new("RGB", (90, 70), (10, 200, 30)))
        with torch.no_grad():
            e = backbone.embed([backbone.request([view], "make it red", "query")])
        assert e.shape == (1, 64)
        return
    from transformers import Qwen3VLModel

    with torch.device("meta"):  # the 8B architecture's size without allocating it
        model = Qwen3VLModel(build_config(card.architecture, preset.config, tiny_tokenizer()))
    n = sum(p.numel() for p in model.parameters())
    assert 7.5e9 < n < 9.0e9, n


def check_blip2_preset(name: str) -> None:
    from lightning_modules.backbones import Blip2Backbone

    preset = get_preset("blip2", name)
    if not preset.random_init:
        assert re.fullmatch(r"[\w\-.]+/[\w\-.]+", preset.hub_id)
        with pytest.raises(OSError, match="save_pretrained"):
            Blip2Backbone(name)
        return
    backbone = Blip2Backbone(name).eval()
    x = backbone.image_transform(Image.new("RGB", (90, 70), (10, 200, 30)))
    assert x.shape == (3, preset.image_size, preset.image_size)
    with torch.no_grad():
        query = backbone.prompted_query(x[None, None], torch.ones(1, 1, dtype=torch.bool), ["make it red"])
        tokens = backbone.target_tokens(*backbone.view_memory(x[None, None], torch.ones(1, 1, dtype=torch.bool)))
    assert query.shape == (1, backbone.dim) and tokens.shape == (1, backbone.num_query_tokens, backbone.dim)
    assert sum(p.numel() for p in backbone.parameters()) < 1_000_000


@pytest.mark.parametrize("family,name", [(f, n) for f, presets in PRESETS.items() for n in presets])
def test_every_preset(family: str, name: str) -> None:
    preset = get_preset(family, name)
    assert preset is not None and preset.name == name and preset.family == family
    if family == "qwen3.5":
        check_qwen_preset(name)
        return
    if family in ("qwen3-vl-embedding", "gme"):
        check_embedder_preset(family, name)
        return
    if family == "blip2":
        check_blip2_preset(name)
        return
    if preset.random_init:
        backbone = CLIPBackbone(name)
        x = backbone.image_transform(Image.new("RGB", (90, 70), (10, 200, 30)))
        assert x.shape == (3, preset.image_size, preset.image_size)
        img = backbone.encode_images(x[None])
        txt = backbone.encode_texts(["make it red", "add an open back and long sleeves"])
        assert img.shape == (1, backbone.dim) and txt.shape == (2, backbone.dim)
        assert sum(p.numel() for p in backbone.parameters()) < 2_000_000
        assert preset.config["text"]["num_hidden_layers"] == 2 and 32 <= preset.config["text"]["hidden_size"] <= 64
    else:
        # Real checkpoints: a hub id of the form org/name; offline, loading fails with the fix.
        assert re.fullmatch(r"[\w\-.]+/[\w\-.]+", preset.hub_id)
        with pytest.raises(OSError, match="save_pretrained"):
            CLIPBackbone(name)


def test_tiny_tokenizer_covers_generated_text(small_data: Path) -> None:
    from datamodules.shards import iterate_shards, read_manifest, shard_urls

    tok = CLIPBackbone("tiny").tokenizer
    urls = shard_urls(small_data, read_manifest(small_data), "train", "triplets")
    for sample in list(iterate_shards(urls))[:30]:
        meta = sample["json"]
        for text in (meta["triplet"]["modification_short"], meta["source"]["long_caption"]):
            assert tok.unk_token_id not in tok(text)["input_ids"]


def test_save_and_load_by_path_gives_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = CLIPBackbone("tiny")
    tiny.save_pretrained(tmp_path / "clip")
    loaded = CLIPBackbone(str(tmp_path / "clip"))
    texts = ["make it blue and add a side slit"]
    img = loaded.image_transform(Image.new("RGB", (64, 64), (200, 0, 0)))[None]
    assert torch.allclose(tiny.encode_texts(texts), loaded.encode_texts(texts), atol=1e-6)
    assert torch.allclose(tiny.encode_images(img), loaded.encode_images(img), atol=1e-6)
    assert loaded.tokenizer("a red dress")["input_ids"] == tiny.tokenizer("a red dress")["input_ids"]


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="neither a preset"):
        CLIPBackbone("no-such-model")
    with pytest.raises(ValueError, match=r"qwen3.5 backbone 'no-such-model' is neither a preset "
                                         r"\(procir-released, qwen3.5-0.8b, "):
        QwenBackbone("no-such-model")
