"""LLaVA-caption CIR: lexicon negatives, cross-combined negatives, frozen caption encoder, the
captioning job (tiny random LLaVA by path, batching, resume, sidecar) and sidecar merging."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from datamodules import ShardDataModule
from datamodules.sidecar import read_sidecar
from lightning_modules import LLaVACaptionCIR, Products, TransformerFusion
from lightning_modules.backbones import CLIPBackbone
from lightning_modules.families.llava_caption.caption_job import run_caption_job
from lightning_modules.families.llava_caption.captioners import LlavaCaptioner, OracleCaptioner
from lightning_modules.families.llava_caption.lexicon import KIND_OF, LEXICON, lexicon_matches, perturb_caption
from lightning_modules.families.llava_caption.prompts import DESCRIBE_PROMPT, REWRITE_PROMPT


def test_paper_prompts_verbatim() -> None:
    assert DESCRIBE_PROMPT == ("Describe this fashion item in detail, focusing on color, pattern, texture, and "
                               "style. Highlight any distinctive elements.")
    assert REWRITE_PROMPT == ("Generate a concise instruction that modifies the original description based on the "
                              "given change.")


def test_synthetic_negatives_differ_only_in_lexicon_words_of_the_same_kind() -> None:
    rng = random.Random(0)
    captions = ["A knee-length dress with floral embroidery on a navy silk base and long sleeves.",
                "Red striped cotton shirt with a v-neck", "A pastel blue satin skirt, plain, with a slit.",
                "black leather jacket with polka dots and a turtleneck"]
    for caption in captions * 25:
        neg = perturb_caption(caption, rng)
        assert neg is not None and neg != caption
        src, dst = lexicon_matches(caption), lexicon_matches(neg)
        # Outside the matched terms the texts are identical...
        assert re.sub(_terms_regex(), "#", caption, flags=re.I) == re.sub(_terms_regex(), "#", neg, flags=re.I)
        # ... and each term was replaced by one of the same kind.
        assert len(src) == len(dst)
        assert all(a[3] == b[3] for a, b in zip(src, dst, strict=True))
    assert perturb_caption("A garment.", rng) is None
    assert set(KIND_OF.values()) == set(LEXICON)


def _terms_regex() -> str:
    terms = sorted(KIND_OF, key=len, reverse=True)
    return r"\b(" + "|".join(re.escape(t) for t in terms) + r")\b"


def _model(**kw) -> LLaVACaptionCIR:
    torch.manual_seed(0)
    return LLaVACaptionCIR(CLIPBackbone("tiny"), TransformerFusion(48), **kw)


def _batch(n: int = 6) -> dict:
    torch.manual_seed(1)
    captions = ["a red plain dress", "a red plain dress", "a blue striped shirt", "a green checked top",
                "a black printed skirt", "a white dotted dress"][:n]
    return {"source_images": torch.randn(n, 2, 3, 64, 64), "source_mask": torch.ones(n, 2, dtype=torch.bool),
            "target_images": torch.randn(n, 1, 3, 64, 64), "target_mask": torch.ones(n, 1, dtype=torch.bool),
            "text": [f"make it variant {i}" for i in range(n)], "source_caption": captions[::-1],
            "target_caption": captions, "target_id": [f"t{i}" for i in range(n)], "modified_text": [""] * n}


def test_augmented_negatives_never_equal_the_positive() -> None:
    model = _model(augmented_negatives=3)
    batch = _batch()
    target = model.encode_target(Products.targets_of(batch))
    negatives, valid = model.augmented_targets(batch, target, model.augmentation_keys(batch))
    assert negatives.shape == (6, 3, 48)
    for i in range(6):
        for j in range(3):
            if valid[i, j]:
                match = [k for k in range(6) if torch.equal(negatives[i, j], target[k])]
                assert match and all(k != i and batch["target_caption"][k] != batch["target_caption"][i]
                                     for k in match)
    # Rows 0 and 1 share their target caption: neither may be the other's negative.
    assert not any(torch.equal(negatives[0, j], target[1]) for j in range(3))


def test_synthetic_targets_keep_the_image_and_swap_the_caption() -> None:
    model = _model(synthetic_negatives=3)
    batch = _batch()
    negatives, valid = model.synthetic_targets(batch)
    assert negatives.shape == (6, 3, 48) and valid.all()
    positive = model.encode_target(Products.targets_of(batch))
    assert not torch.allclose(negatives[:, 0], positive)
    _, none_valid = model.synthetic_targets({**batch, "target_caption": [""] * 6})
    assert not none_valid.any()  # nothing to perturb: every slot invalid, so the loss drops the term


def test_training_terms_and_frozen_caption_encoder() -> None:
    model = _model()
    frozen = {k: v.clone() for k, v in model.target_text.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    for _ in range(2):
        terms = model.training_terms(model.embed_pair(batch), batch)
        assert {"in_batch", "synthetic", "augmented", "loss"} <= set(terms)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in model.target_text.state_dict().items())
    assert not model.target_text.training
    texts = model.query_texts(batch)
    assert texts[0].startswith("make it variant 0") and batch["source_caption"][0] in texts[0]


def test_transformer_fusion_starts_as_sum_fusion() -> None:
    from lightning_modules.components.fusion import SumFusion

    fusion = TransformerFusion(48).eval()
    img, txt = torch.randn(4, 48), torch.randn(4, 48)
    assert torch.allclose(fusion(img, txt), SumFusion()(img, txt), atol=1e-6)


class _Counting:
    """Wraps a captioner: counts what it is asked, and can die after N batches like a killed job."""

    def __init__(self, inner, die_after: int | None = None) -> None:
        self.inner, self.name = inner, inner.name
        self.die_after, self.batches, self.seen = die_after, 0, []

    def _tick(self) -> None:
        self.batches += 1
        if self.die_after is not None and self.batches > self.die_after:
            raise KeyboardInterrupt("killed")

    def describe(self, images, prompt, metas):
        self._tick()
        self.seen += [f"{m['dataset']}--{m['product_id']}" for m in metas]
        return self.inner.describe(images, prompt, metas)

    def rewrite(self, texts, prompt, metas):
        self._tick()
        self.seen += texts
        return self.inner.rewrite(texts, prompt, metas)


@pytest.mark.slow
def test_caption_job_with_a_tiny_llava_by_path_resumes_without_recaptioning(small_data: Path, tmp_path: Path) -> None:
    from lightning_modules.backbones.tiny_llava import save_tiny_llava

    save_tiny_llava(tmp_path / "tiny-llava")
    llava = LlavaCaptioner(str(tmp_path / "tiny-llava"), max_new_tokens=6)
    out = tmp_path / "captions.jsonl"
    first = _Counting(llava, die_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_caption_job(small_data, out, first, splits=["val"], batch_size=4, progress=False)
    done_first = read_sidecar(out)
    assert len(done_first) == 8  # two whole batches reached the disk before the kill

    second = _Counting(llava)
    counts = run_caption_job(small_data, out, second, splits=["val"], batch_size=4, progress=False)
    records = read_sidecar(out)
    manifest = json.loads((small_data / "manifest.json").read_text())
    n_products, n_triplets = manifest["splits"]["val"]["products"], manifest["splits"]["val"]["triplets"]
    assert counts["skipped_existing"] == 8 and counts["captioned"] == n_products - 8
    assert not set(done_first) & set(second.seen)  # nothing captioned twice
    lines = out.read_text().splitlines()
    assert len(lines) == len(records) == n_products + n_triplets  # one record per id
    kinds = {r["kind"] for r in records.values()}
    assert kinds == {"caption", "modified_text"} and all(r["captioner"] == "llava" for r in records.values())
    assert all(isinstance(r["text"], str) for r in records.values())


def test_oracle_sidecar_is_merged_into_batches(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "oracle.jsonl"
    run_caption_job(small_data, out, OracleCaptioner(), splits=["val"], batch_size=16, progress=False)
    records = read_sidecar(out)
    dm = ShardDataModule(str(small_data), num_workers=0, eval_batch_size=8, captions_file=str(out))
    gallery, queries = dm.val_dataloader()
    g = next(iter(gallery))
    assert g["caption"][0] == records[f"{g['dataset'][0]}--{g['product_id'][0]}"]["text"]
    q = next(iter(queries))
    assert q["source_caption"][0] == records[f"{q['dataset'][0]}--{q['source_id'][0]}"]["text"]
    assert q["modified_text"][0] == q["meta"][0]["triplet"]["modification_long"]
    # Torn last line (a run killed mid-write) is ignored; a bad line elsewhere is an error naming it.
    out.write_text(out.read_text() + '{"key": "x", "kin')
    assert len(read_sidecar(out)) == len(records)
    out.write_text('{"key": bad}\n' + out.read_text())
    with pytest.raises(ValueError, match=":1:"):
        read_sidecar(out)
