"""ProCIR: KV-cached queries, the SFT stage, the Qwen captioner, schedules and the experiment configs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.procir import model, product_images, tokens, views

from lightning_modules import ProCIR, ProCIRSFT
from lightning_modules.backbones.qwen import EMB_TOKEN, IMAGE_PAD, THINK_END, QwenBackbone
from lightning_modules.backbones.qwen_chat import Dialogue


def test_kv_cached_query_equals_the_full_forward() -> None:
    """Tolerance: 1e-5 on unit vectors in float32 (measured ~1e-7; the chunked linear-attention
    kernel sums in a different order when it starts from a cached state)."""
    from lightning_modules.families.procir.interactive import InteractiveEncoder

    backbone = QwenBackbone("tiny", seed=1)
    # Random init decays the linear-attention state within a few tokens and scales its output
    # down; a slow decay and a louder output make the recurrent state matter for turn 2.
    with torch.no_grad():
        for layer in backbone.model.model.language_model.layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.A_log.fill_(-6.0)
                layer.linear_attn.out_proj.weight.mul_(30.0)
    enc = InteractiveEncoder(model(backbone))
    source = product_images(3, 50)
    cache = enc.cache_source(source)
    for text in ("make it red", "add long sleeves, a pocket on the left side and a round neck"):
        full = enc.encode_query(source, text)
        cached = enc.encode_query(None, text, cache=cache)
        assert torch.allclose(full, cached, atol=1e-5)
    # The cache really carries turn 1: another source's cache, or one without the linear-attention
    # layers' recurrent state, gives a different q.
    other = enc.encode_query(None, "make it red", cache=enc.cache_source(product_images(2, 51)))
    assert not torch.allclose(other, enc.encode_query(source, "make it red"), atol=1e-3)
    import copy

    broken = copy.deepcopy(cache)
    linear = [layer for layer in broken.past_key_values.layers if hasattr(layer, "recurrent_states")]
    assert linear, "the tiny preset has a linear-attention layer"
    for layer in linear:
        layer.recurrent_states = {k: torch.zeros_like(v) for k, v in layer.recurrent_states.items()}
    assert not torch.allclose(enc.encode_query(None, "make it red", cache=broken),
                              enc.encode_query(source, "make it red"), atol=1e-3)


def test_sft_dialogues_train_only_assistant_tokens(backbone: QwenBackbone) -> None:
    sft = ProCIRSFT(backbone, sample_fraction=1.0, caption_system_prompt=None)
    product = {"long_caption": "a red dress with long sleeves", "short_caption": "red dress",
               "view_captions": ["front view of a red dress", "back view of a red dress"]}
    target = {"long_caption": "a blue dress", "short_caption": "blue dress"}
    meta = {"source": product, "target": target,
            "triplet": {"views_involved": ["front"], "modification_long": "make the red dress blue",
                        "modification_short": "make it blue"}}
    cap = sft.caption_dialogue(views(backbone, 2, 60), product)
    trip = sft.triplet_dialogue(views(backbone, 2, 60), views(backbone, 1, 61), meta)
    for seq in (cap, trip):
        toks = tokens(backbone, seq)
        labels = sft.dialogue.batch([seq], "cpu")["labels"][0]
        trained = [t for t, lab in zip(toks, labels.tolist(), strict=True) if lab != -100]
        # Everything trained lies inside assistant turns: from <think> to <|im_end|>.
        starts = [i for i, t in enumerate(toks) if t == "<|im_start|>" and toks[i + 1] == "assistant"]
        inside = set()
        for s in starts:
            end = toks.index("<|im_end|>", s)
            inside |= set(range(s + 2, end + 1))
        assert {i for i, lab in enumerate(labels.tolist()) if lab != -100} == inside
        assert IMAGE_PAD not in trained and "user" not in trained
    assert tokens(backbone, trip).count(EMB_TOKEN) == 2 and tokens(backbone, trip).count("user") == 3
    answer = backbone.tokenizer.decode(cap.ids[cap.ids.index(backbone.token_ids[THINK_END]) + 1:])
    assert "long _ caption" in answer or "long_caption" in answer
    # 20% sampling: a binomial count over 2 × 500 chances.
    sampler = ProCIRSFT(backbone, sample_fraction=0.2, caption_system_prompt=None, seed=3)
    sampler.caption_dialogue = lambda *a: Dialogue(ids=[1])
    sampler.triplet_dialogue = lambda *a: Dialogue(ids=[1])
    batch = {"meta": [meta] * 500, "source_images": [None] * 500, "target_images": [None] * 500}
    assert 160 <= len(sampler.dialogues(batch, 0.2)) <= 240
    # A batch that draws nothing still yields one dialogue: no rank may skip a DDP step.
    assert len(sampler.dialogues({k: v[:1] for k, v in batch.items()}, 1e-9)) == 1


def test_sft_caption_dialogue_json_and_system_prompt(backbone: QwenBackbone) -> None:
    from lightning_modules.construction.prompts import default_prompt
    from lightning_modules.families.procir.prompts import CAPTION_SYSTEM_PROMPT

    product = {"long_caption": "a red dress", "short_caption": "red", "view_captions": ["front view"]}
    with_prompt = ProCIRSFT(backbone).caption_dialogue(views(backbone, 1, 70), product)
    toks = tokens(backbone, with_prompt)
    assert toks[:2] == ["<|im_start|>", "system"] and "catalogue" in toks
    # One caption prompt for the SFT stage and the dataset pipeline's stage 1.
    assert CAPTION_SYSTEM_PROMPT == default_prompt("captions") and "image_captions" in CAPTION_SYSTEM_PROMPT
    assert json.loads(json.dumps({"long_caption": "a red dress"}))  # the answer is json.dumps output
    assert backbone.tokenizer.unk_token_id not in with_prompt.ids  # the tiny vocabulary covers the prompt


def test_missing_sft_checkpoint_names_the_command(backbone: QwenBackbone, tmp_path: Path) -> None:
    m = ProCIR(backbone, sft_checkpoint=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="experiments/procir/sft_stage.yaml"):
        m._load_sft_checkpoint()


def test_cot_without_the_schedule_callback_is_an_error(backbone: QwenBackbone) -> None:
    m = ProCIR(backbone, cot=True)
    m._trainer = SimpleNamespace(callbacks=[])
    with pytest.raises(ValueError, match="CoTSchedule"):
        ProCIR.on_train_start(m)


def test_qwen_captioner_from_a_saved_tiny_folder(backbone: QwenBackbone, tmp_path: Path) -> None:
    from lightning_modules.families.llava_caption.captioners import QwenCaptioner
    from lightning_modules.families.llava_caption.prompts import DESCRIBE_PROMPT, REWRITE_PROMPT

    backbone.save_pretrained(tmp_path / "qwen")
    captioner = QwenCaptioner(str(tmp_path / "qwen"), max_new_tokens=5)
    images = product_images(3, 80)
    described = captioner.describe(images, DESCRIBE_PROMPT, [{}] * 3)
    rewritten = captioner.rewrite(["a red dress", "a long blue skirt with pockets"], REWRITE_PROMPT, [{}] * 2)
    assert len(described) == 3 and len(rewritten) == 2
    assert all(isinstance(t, str) and len(t.split()) <= 5 for t in described + rewritten)
    # Batched (left-padded) generation gives what one-by-one generation gives.
    assert captioner.describe(images[1:2], DESCRIBE_PROMPT, [{}]) == described[1:2]


def test_cosine_schedule_and_the_run_length(small_data: Path) -> None:
    from datamodules import ShardDataModule
    from lightning_modules.core import total_training_steps
    from lightning_modules.core.schedules import CosineSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = CosineSchedule(opt, total_steps=110, warmup_steps=10)
    assert [round(sched.factor(s), 6) for s in (0, 9, 10, 60, 110, 200)] == [0.1, 1.0, 1.0, 0.5, 0.0, 0.0]
    # The endless (resampled) training stream still tells the Trainer its epoch length...
    dm = ShardDataModule(data_dir=str(small_data), batch_size=8, num_workers=0)
    per_worker, workers = dm.train_batches_per_worker()
    assert len(dm.train_dataloader()) == per_worker * workers
    # ...and a schedule without a known length is an error, not a learning rate stuck at 0.
    with pytest.raises(ValueError, match="max_steps"):
        total_training_steps(SimpleNamespace(estimated_stepping_batches=float("inf")))


def test_print_config_of_procir_sft_shows_the_papers_settings(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from cir.lightning_cli import build_cli

    root = Path(__file__).parents[4]
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(root / "experiments/procir_sft.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    model, trainer, data = cfg["model"]["init_args"], cfg["trainer"], cfg["data"]["init_args"]
    assert model["backbone"]["init_args"]["name_or_path"] == "qwen3.5-0.8b"
    assert (model["two_stage_dialogue"], model["align"], model["cot"]) == (True, True, False)
    assert model["doc_align_weight"] == model["src_align_weight"] == 0.25
    assert model["loss"]["init_args"] == {"temperature": 0.07, "learnable_temperature": False,
                                          "max_logit_scale": 100.0}
    # Rank and world size are injected by the module, never user configuration.
    assert not re.search(r"\b(rank|world_size)\b", printed)
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["lr"] == 1e-5 and model["optimizer"]["init_args"]["weight_decay"] == 0.01
    assert model["scheduler"]["class_path"] == "lightning_modules.CosineSchedule"
    assert model["scheduler"]["init_args"]["warmup_steps"] == 0
    assert model["sft_checkpoint"] == "outputs/procir_sft_stage/checkpoints/last.ckpt"
    assert (trainer["precision"], trainer["gradient_clip_val"], trainer["max_epochs"]) == ("bf16-mixed", 1.0, 1)
    assert data["batch_size"] == 16 and data["train_text"] == "mixed"


def test_the_16_ablation_configs_cover_8_variants_times_2_initialisations() -> None:
    from cir.lightning_cli import expand_defaults

    root = Path(__file__).parents[4]
    seen = set()
    for path in sorted((root / "experiments/procir/ablations").glob("*.yaml")):
        import yaml

        files = [a for i, a in enumerate(expand_defaults(["--config", str(path)])[1:]) if i % 2 == 0]
        merged: dict = {}
        callbacks = []
        for f in files:
            cfg = yaml.safe_load(Path(f).read_text()) or {}
            merged.update(cfg.get("model", {}).get("init_args", {}))
            callbacks += [c["class_path"] for c in cfg.get("trainer", {}).get("callbacks+", [])]
        key = (merged["two_stage_dialogue"], merged["align"], merged["cot"], merged.get("sft_checkpoint") is not None)
        assert key not in seen, path.name
        seen.add(key)
        assert ("callbacks.CoTSchedule" in callbacks) == merged["cot"], path.name
    assert len(seen) == 16


