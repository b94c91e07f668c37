"""LoRA adapters (``core.adapters``): what trains, what a fresh adapter changes (nothing), what one step
changes (only the adapters), merging back to the plain model, and the default target table."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_modules import CLIP4CIR, Combiner, Products
from lightning_modules.backbones import Blip2Backbone, CLIPBackbone, QwenBackbone, VLEmbedderBackbone
from lightning_modules.core.adapters import (
    DEFAULT_TARGETS,
    LoraSettings,
    apply_lora,
    fit_state_dict,
    lora_parameter_count,
    merge_lora,
    name_matches,
)

R = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tiny models run fastest on one thread: two threads per process on a busy 2-core machine
    made their steps 10-30× slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip4cir() -> CLIP4CIR:
    torch.manual_seed(0)
    return CLIP4CIR(CLIPBackbone("tiny"), Combiner(48, dropout=0.0)).eval()


def batch() -> dict:
    gen = torch.Generator().manual_seed(1)
    return {"source_images": torch.randn(4, 2, 3, 64, 64, generator=gen),
            "source_mask": torch.tensor([[True, True], [True, False], [True, True], [True, False]]),
            "target_images": torch.randn(4, 1, 3, 64, 64, generator=gen),
            "target_mask": torch.ones(4, 1, dtype=torch.bool),
            "text": ["make it red", "add an open back", "long sleeves", "switch to stripes"]}


def outputs(model: CLIP4CIR) -> torch.Tensor:
    with torch.no_grad():
        data = batch()
        return torch.cat([model.encode_query(data), model.encode_target(Products.targets_of(data))])


def test_only_adapters_and_the_non_backbone_parts_train_and_the_count_is_the_hand_count() -> None:
    model = clip4cir()
    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}
    apply_lora(model, LoraSettings(r=R))
    # Tiny CLIP: 2 text + 2 vision layers, width 48, MLP 96. Per layer q, k, v, out (48 → 48) and
    # fc1 (48 → 96), fc2 (96 → 48); an adapter holds r·(in + out) weights.
    per_layer = 4 * R * (48 + 48) + 2 * R * (48 + 96)
    assert lora_parameter_count(model) == 4 * per_layer == 10752
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    assert sum(p.numel() for n, p in model.named_parameters() if n in adapters) == 10752
    # Beside the adapters: the Combiner and the loss's temperature, never a backbone weight.
    assert trainable - adapters == {n for n, _ in model.named_parameters()
                                    if n.startswith(("fusion.", "loss.")) and n not in frozen_before}
    assert trainable - adapters and not any(n.startswith("backbone.") for n in trainable - adapters)
    q_proj = model.backbone.model.text_model.encoder.layers[0].self_attn.q_proj  # the tree keeps its names
    assert q_proj.lora_A["default"].weight.shape == (R, 48) and not q_proj.base_layer.weight.requires_grad


def test_qwen_adapters_cover_both_attention_kinds_and_vision_only_when_asked() -> None:
    backbone = QwenBackbone("tiny")
    apply_lora(backbone, LoraSettings(r=R))
    # Tiny Qwen3.5, width 64, MLP 128. Linear-attention layer: in_proj_qkv 64 → 192, in_proj_z and
    # out_proj 64 → 64; full-attention layer: q 64 → 128, k and v 64 → 32, o 64 → 64; both MLPs
    # gate/up 64 → 128 and down 128 → 64. in_proj_a/b (64 → 2) are left alone.
    mlp = 3 * (64 + 128)
    linear_attention = (64 + 192) + 2 * (64 + 64) + mlp
    full_attention = (64 + 128) + 2 * (64 + 32) + (64 + 64) + mlp
    assert lora_parameter_count(backbone) == R * (linear_attention + full_attention) == 8704
    assert not any("visual" in n for n, p in backbone.named_parameters() if p.requires_grad)
    with_vision = QwenBackbone("tiny")
    apply_lora(with_vision, LoraSettings(r=R, vision=True))
    # Two vision blocks of width 32, MLP 64: qkv 32 → 96, proj 32 → 32, fc1 32 → 64, fc2 64 → 32.
    assert lora_parameter_count(with_vision) - 8704 == 2 * R * ((32 + 96) + (32 + 32) + 2 * (32 + 64)) == 3072


def test_fresh_adapters_change_no_output() -> None:
    model = clip4cir()
    before = outputs(model)
    apply_lora(model, LoraSettings(r=R))
    assert torch.equal(outputs(model), before)  # B starts at zero: base + 0, bit for bit


def test_one_step_moves_only_adapters_and_merging_gives_the_plain_model_back() -> None:
    model = clip4cir()
    plain_keys = list(model.state_dict())
    before = outputs(model)
    apply_lora(model, LoraSettings(r=R, dropout=0.0))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    data = batch()
    model.train()
    model.loss(model.encode_query(data), model.encode_target(Products.targets_of(data)), gather=False).backward()
    optimizer.step()
    model.eval()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    adapted = outputs(model)
    assert (adapted - before).abs().max() > 1e-4  # the control: the step did change the model

    assert merge_lora(model) == 24  # 4 layers × 6 linear maps
    assert list(model.state_dict()) == plain_keys
    assert torch.allclose(outputs(model), adapted, atol=1e-5)
    fresh = clip4cir()
    fresh.load_state_dict(model.state_dict())  # strict: a model without LoRA takes it as it is
    assert torch.allclose(outputs(fresh), adapted, atol=1e-5)


def test_a_plain_state_dict_fits_a_model_with_adapters() -> None:
    trained = clip4cir()
    torch.nn.init.normal_(trained.backbone.model.text_model.encoder.layers[0].mlp.fc1.weight)
    model = clip4cir()
    apply_lora(model, LoraSettings(r=R))
    missing, unexpected = model.load_state_dict(fit_state_dict(model, trained.state_dict()), strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)
    assert torch.equal(outputs(model), outputs(trained))


def test_a_second_call_changes_nothing() -> None:
    model = clip4cir()
    apply_lora(model, LoraSettings(r=R))
    keys = list(model.state_dict())
    apply_lora(model, LoraSettings(r=8))
    assert list(model.state_dict()) == keys and lora_parameter_count(model) == 10752


def test_patterns_that_name_nothing_are_errors_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.init_args\.lora\.targets: \['q_projection'\] match no linear"):
        apply_lora(clip4cir(), LoraSettings(targets=["q_proj", "q_projection"]))
    with pytest.raises(ValueError, match=r"model\.init_args\.lora\.train_also: \['no_such_head'\]"):
        apply_lora(clip4cir(), LoraSettings(train_also=["no_such_head"]))
    with pytest.raises(ValueError, match=r"lora\.r=0: must be >= 1; .*lora\.dropout=1\.5: must be in \[0, 1\)"):
        LoraSettings(r=0, dropout=1.5)


def test_targets_and_train_also_choose_what_trains() -> None:
    model = clip4cir()
    apply_lora(model, LoraSettings(r=R, targets=[r"self_attn\.(q|v)_proj"], train_also=["text_projection"]))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if ".lora_" in n}
    assert adapted == {"q_proj", "v_proj"} and lora_parameter_count(model) == 4 * 2 * R * 96
    assert model.backbone.model.text_projection.weight.requires_grad
    assert not model.backbone.model.visual_projection.weight.requires_grad


def test_adapters_of_half_precision_weights_are_float32() -> None:
    backbone = CLIPBackbone("tiny").to(torch.bfloat16)
    apply_lora(backbone, LoraSettings(r=R))
    dtypes = {n: p.dtype for n, p in backbone.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert dtypes["model.text_projection.weight"] == torch.bfloat16
    feats = backbone.encode_texts(["make it red"])
    assert feats.dtype == torch.bfloat16 and torch.isfinite(feats.float()).all()


def test_yaml_builds_the_settings() -> None:
    parser = ArgumentParser()
    parser.add_argument("--lora", type=LoraSettings | None, default=None)
    cfg = parser.parse_args(["--lora", "{r: 8, targets: [q_proj], vision: true}"])
    settings = parser.instantiate_classes(cfg).lora
    assert settings == LoraSettings(r=8, targets=["q_proj"], vision=True)


TINY = {
    CLIPBackbone: [lambda: CLIPBackbone("tiny")],
    QwenBackbone: [lambda: QwenBackbone("tiny")],
    VLEmbedderBackbone: [lambda: VLEmbedderBackbone("tiny"), lambda: VLEmbedderBackbone("tiny", family="gme")],
    Blip2Backbone: [lambda: Blip2Backbone("tiny")],
}
CASES = [(kind, i) for kind, makers in TINY.items() for i in range(len(makers))]


def test_every_table_entry_has_a_tiny_preset_here() -> None:
    assert set(TINY) == set(DEFAULT_TARGETS)


@pytest.mark.parametrize(("kind", "index"), CASES, ids=lambda c: c.__name__ if isinstance(c, type) else str(c))
def test_every_default_pattern_matches_its_tiny_preset(kind: type, index: int) -> None:
    backbone = TINY[kind][index]()
    linears = [n for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)]
    table = DEFAULT_TARGETS[kind]
    for pattern in (*table.default, *table.vision):
        hits = [n for n in linears if name_matches(pattern, n)]
        assert hits, f"{kind.__name__}: {pattern} matches none of {linears}"
        # Every hit is inside a transformer layer (a numbered block), never a projection head.
        assert all(re.search(r"\.\d+\.", n) for n in hits), hits
    apply_lora(backbone, LoraSettings(r=2))
    for name in table.keep_trainable:
        assert backbone.get_parameter(name).requires_grad
