"""The BLIP-2 backbone: the tiny preset, save/load by path, and each pass against transformers' own
forward of ``Blip2ForImageTextRetrieval`` or an equivalent input built another way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_modules.backbones import Blip2Backbone, get_preset


@pytest.fixture(scope="module")
def tiny() -> Blip2Backbone:
    torch.manual_seed(0)
    return Blip2Backbone("tiny").eval()


def _one_view(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 1, 3, 64, 64), torch.ones(n, 1, dtype=torch.bool)


def test_tiny_preset_builds_small_and_processes_pil_images(tiny: Blip2Backbone) -> None:
    preset = get_preset("blip2", "tiny")
    assert preset.random_init and tiny.dim == 48 and tiny.hidden_size == 48 and tiny.num_query_tokens == 8
    assert sum(p.numel() for p in tiny.parameters()) < 500_000
    x = tiny.image_transform(Image.new("RGB", (90, 70), (10, 200, 30)))
    assert x.shape == (3, 64, 64)
    # Random weights are drawn, not left at transformers' placeholders (zeros, 1e-10).
    assert tiny.model.query_tokens.std() > 1e-3 and tiny.model.vision_model.embeddings.position_embedding.std() > 1e-3
    assert not any(p.requires_grad for p in tiny.model.itm_head.parameters())


def test_tiny_tokenizer_covers_generated_text(tiny: Blip2Backbone, small_data: Path) -> None:
    from datamodules.shards import iterate_shards, read_manifest, shard_urls

    urls = shard_urls(small_data, read_manifest(small_data), "train", "triplets")
    for sample in list(iterate_shards(urls))[:20]:
        meta = sample["json"]
        for text in (meta["triplet"]["modification_short"], meta["source"]["long_caption"]):
            ids = tiny.tokenizer(text)["input_ids"]
            assert tiny.tokenizer.unk_token_id not in ids and ids[0] == tiny.tokenizer.cls_token_id
    ids, mask = tiny.tokenize(["make it red", "add a pocket on the left side"])
    assert ids.shape == mask.shape == (2, 32) and mask.sum(1).tolist() == [5, 9]  # [CLS] words [SEP], padded


def test_passes_match_transformers_forward(tiny: Blip2Backbone) -> None:
    images, mask = _one_view()
    texts = ["make it red", "add a long sleeve"]
    ids, text_mask = tiny.tokenize(texts)
    with torch.no_grad():
        itm = tiny.model(pixel_values=images[:, 0], input_ids=ids, attention_mask=text_mask,
                         use_image_text_matching_head=True, return_dict=True)
        itc = tiny.model(pixel_values=images[:, 0], input_ids=ids, attention_mask=text_mask, return_dict=True)
        memory = tiny.view_memory(images, mask)
        prompt = tiny.sentence_prompt(*memory, ids, text_mask)
        tokens = tiny.target_tokens(*memory)
        text = tiny.text_branch().text_feature(ids, text_mask)
        # An empty prompt leaves the text alone: the fused feature is then the plain text feature.
        empty = tiny.text_branch().fuse(prompt[:, :0], ids, text_mask)
    # The ITM forward runs queries + text with the image: its query part is the sentence-level prompt.
    assert torch.allclose(prompt, itm.text_model_output.last_hidden_state[:, :8], atol=1e-5)
    assert torch.allclose(tokens, itc.image_embeds, atol=1e-5)
    assert torch.allclose(text, itc.text_embeds, atol=1e-5)
    assert torch.allclose(empty, itc.text_embeds, atol=1e-5)


def test_prefix_tokens_sit_after_the_first_token(tiny: Blip2Backbone) -> None:
    """A prefix is the same as extra words after [CLS] whose embeddings are the prefix vectors."""
    ids, mask = tiny.tokenize(["make it blue"])
    torch.manual_seed(2)
    prefix = torch.randn(3, 48) * 0.02
    twin = Blip2Backbone("tiny").eval()
    twin.load_state_dict(tiny.state_dict())
    words = twin.model.embeddings.word_embeddings.weight
    free = [i for i in range(len(twin.tokenizer) - 1, 0, -1) if i not in ids][:3]  # rows the text never uses
    with torch.no_grad():
        words[free] = prefix
        spliced = torch.cat([ids[:, :1], torch.tensor([free]), ids[:, 1:]], dim=1)
        spliced_mask = torch.cat([mask[:, :1], torch.ones(1, 3, dtype=mask.dtype), mask[:, 1:]], dim=1)
        expected = twin.text_branch().text_feature(spliced, spliced_mask)
        got = tiny.text_branch().text_feature(ids, mask, prefix=prefix)
        plain = tiny.text_branch().text_feature(ids, mask)
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)


def test_padded_views_are_masked_out_of_the_memory(tiny: Blip2Backbone) -> None:
    """A product with a padded view slot gives what its real view alone gives, whatever the slot
    holds; the same slot unmasked changes the result (the mask, not chance, keeps it out)."""
    torch.manual_seed(3)
    views = torch.randn(1, 2, 3, 64, 64)
    views[0, 1] = 100.0  # whatever sits in a padded slot must not matter
    one, two = torch.tensor([[True, False]]), torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        alone = tiny.target_tokens(*tiny.view_memory(views[:, :1], torch.ones(1, 1, dtype=torch.bool)))
        padded = tiny.target_tokens(*tiny.view_memory(views, one))
        both = tiny.target_tokens(*tiny.view_memory(views, two))
        text = tiny.tokenize(["make it red"])
        p_alone = tiny.sentence_prompt(*tiny.view_memory(views[:, :1], torch.ones(1, 1, dtype=torch.bool)), *text)
        p_padded = tiny.sentence_prompt(*tiny.view_memory(views, one), *text)
        p_both = tiny.sentence_prompt(*tiny.view_memory(views, two), *text)
    assert (alone - padded).abs().max() < 1e-5 and (p_alone - p_padded).abs().max() < 1e-5
    assert (alone - both).abs().max() > 1e-2 and (p_alone - p_both).abs().max() > 1e-2


def test_save_and_load_by_path_gives_the_same_model(tiny: Blip2Backbone, tmp_path: Path) -> None:
    tiny.save_pretrained(tmp_path / "blip2")
    loaded = Blip2Backbone(str(tmp_path / "blip2")).eval()
    images, mask = _one_view()
    texts = ["make it blue and add a side slit", "make it red"]
    with torch.no_grad():
        assert torch.allclose(tiny.prompted_query(images, mask, texts), loaded.prompted_query(images, mask, texts),
                              atol=1e-6)
        assert torch.allclose(tiny.target_tokens(*tiny.view_memory(images, mask)),
                              loaded.target_tokens(*loaded.view_memory(images, mask)), atol=1e-6)
    assert loaded.tokenizer("a red dress")["input_ids"] == tiny.tokenizer("a red dress")["input_ids"]
    assert loaded.image_transform(Image.new("RGB", (30, 50))).shape == (3, 64, 64)


def test_hub_preset_offline_names_the_fix() -> None:
    assert get_preset("blip2", "blip2-itm-vit-g").hub_id == "Salesforce/blip2-itm-vit-g"
    with pytest.raises(OSError, match="save_pretrained"):
        Blip2Backbone("blip2-itm-vit-g")
    with pytest.raises(ValueError, match="neither a preset"):
        Blip2Backbone("no-such-model")
    with pytest.raises(ValueError, match=r"backbone\.init_args: max_text_length=200: must be 1 to the Q-Former's 128"):
        Blip2Backbone("tiny", max_text_length=200)
