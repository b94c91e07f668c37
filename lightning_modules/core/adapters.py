"""LoRA adapters (PEFT) on a family's backbone(s): the switch ``model.init_args.lora`` of every family.

``apply_lora`` puts low-rank adapters beside chosen linear layers of every backbone the model holds
(``DEFAULT_TARGETS`` says which, per backbone class) and freezes the rest of those backbones. What
is not part of a backbone keeps its own trainability: fusion heads, the losses' temperatures,
SPRC's prompt tokens, LLaVA-caption CIR's query-text projection go on training in full, and what a
family froze (the frozen caption encoder, a ViT) stays frozen. ``merge_lora`` folds the adapters
back into the weights, so the model's state dict has the keys of a model without LoRA again.

Names: a LoRA'd layer keeps its place in the module tree (``backbone.model...q_proj`` still works),
its weight moves to ``...q_proj.base_layer.weight`` and the adapters are
``...q_proj.lora_A.default.weight`` (``[r, in]``) and ``...q_proj.lora_B.default.weight``
(``[out, r]``, zero at the start, so a fresh adapter changes nothing).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..backbones.blip2 import Blip2Backbone
from ..backbones.clip import CLIPBackbone
from ..backbones.qwen import QwenBackbone
from ..backbones.vl_embedder import VLEmbedderBackbone

KEY = "model.init_args.lora"
ADAPTER_MARK = ".lora_"  # in the name of every adapter parameter, never in a base weight's


@dataclass
class LoraSettings:
    """LoRA on the backbone(s) of a family (``lora: {r: 8}`` in an experiment).

    Args:
        r: rank of the adapters.
        alpha: scale numerator: an adapter adds ``(alpha / r) · B A x``.
        dropout: dropout on an adapter's input (training only).
        targets: regular expressions naming the linear layers to adapt, each matched against the end of
            a layer's dotted name inside the backbone (at a dot), e.g. ``q_proj``, ``self_attn\\.(q|v)_proj``
            or ``text_model\\..*fc1``; None: the backbone's defaults (``DEFAULT_TARGETS``).
        vision: also adapt the vision tower of Qwen3.5, of the VL embedders and BLIP-2's ViT, which the
            defaults leave frozen (CLIP's defaults cover both of its towers already).
        train_also: patterns of backbone parts trained in full beside the adapters (matched like
            ``targets``, against the model's module and parameter names), e.g. ``text_projection``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] | None = None
    vision: bool = False
    train_also: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        problems = []
        if self.r < 1:
            problems.append(f"{KEY}.r={self.r}: must be >= 1")
        if self.alpha <= 0:
            problems.append(f"{KEY}.alpha={self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            problems.append(f"{KEY}.dropout={self.dropout}: must be in [0, 1)")
        for key, patterns in (("targets", self.targets or []), ("train_also", self.train_also)):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    problems.append(f"{KEY}.{key}: {pattern!r} is not a regular expression ({exc})")
        if self.targets is not None and not self.targets:
            problems.append(f"{KEY}.targets=[]: name at least one layer, or null for the defaults")
        if problems:
            raise ValueError("; ".join(problems))


# A module built by hand (not by LightningCLI) keeps its settings in its hyperparameters, and so in
# every checkpoint: they must load under ``torch.load(weights_only=True)``.
torch.serialization.add_safe_globals([LoraSettings])


@dataclass(frozen=True)
class BackboneTargets:
    """Where LoRA goes in one kind of backbone: ``default`` patterns, ``vision`` patterns added by
    ``LoraSettings.vision``, and small backbone parameters that stay trainable in full."""

    default: tuple[str, ...]
    vision: tuple[str, ...] = ()
    keep_trainable: tuple[str, ...] = ()


# Attention and MLP projections of the transformer layers. Qwen3.5's linear-attention (Gated DeltaNet)
# layers get their q/k/v, gate (z) and output projections; in_proj_a/in_proj_b map to one value per
# head (16 outputs in 0.8B), where a rank-16 adapter would hold more weights than the layer itself.
_QWEN_LANGUAGE = (r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj"
                  r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))")
_QWEN_VISION = r"visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear_)?fc[12])"

DEFAULT_TARGETS: dict[type[nn.Module], BackboneTargets] = {
    CLIPBackbone: BackboneTargets(
        default=(r"(text|vision)_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",)),
    QwenBackbone: BackboneTargets(default=(_QWEN_LANGUAGE,), vision=(_QWEN_VISION,)),
    VLEmbedderBackbone: BackboneTargets(default=(_QWEN_LANGUAGE,), vision=(_QWEN_VISION,)),
    Blip2Backbone: BackboneTargets(
        default=(r"qformer\.encoder\.layer\.\d+\.((attention|crossattention)\.(attention\.(query|key|value)"
                 r"|output\.dense)|(intermediate|output)(_query)?\.dense)",),
        vision=(r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(qkv|projection)|mlp\.fc[12])",),
        # The learned query tokens are the Q-Former's input (32 × 768 in BLIP-2): trained in full.
        keep_trainable=("model.query_tokens",)),
}


@runtime_checkable
class LoraConfigured(Protocol):
    """A model built with a LoRA setting (every family: ``model.init_args.lora``)."""

    lora: LoraSettings | None


def name_matches(pattern: str, name: str) -> bool:
    """``pattern`` matches the end of the dotted ``name`` at a dot boundary (or all of it)."""
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None


def backbones_of(model: nn.Module) -> list[tuple[str, nn.Module, BackboneTargets]]:
    """Every backbone of ``model`` that ``DEFAULT_TARGETS`` knows, with its name and targets."""
    found = []
    for name, module in model.named_modules():
        kind = next((k for k in DEFAULT_TARGETS if isinstance(module, k)), None)
        if kind is not None:
            found.append((name, module, DEFAULT_TARGETS[kind]))
    return found


def is_lora_model(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def has_lora_weights(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict was saved from a model with (unmerged) LoRA adapters."""
    return any(ADAPTER_MARK in k for k in state)


def _linear_names(backbone: nn.Module) -> list[str]:
    return [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]


def _chosen_layers(backbone: nn.Module, patterns: Iterable[str]) -> dict[str, list[str]]:
    """Pattern → the backbone's linear layers it names."""
    linears = _linear_names(backbone)
    return {p: [n for n in linears if name_matches(p, n)] for p in patterns}


def apply_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Inject LoRA adapters into every backbone of ``model`` in place and freeze their base weights.

    Does nothing when the model has adapters already (a second call, a model restored with them).
    Raises a ``ValueError`` naming ``model.init_args.lora.targets`` (or ``train_also``) when a pattern
    names nothing, listing what the backbone's linear layers are called."""
    if is_lora_model(model):
        return
    backbones = backbones_of(model)
    if not backbones:
        kinds = ", ".join(k.__name__ for k in DEFAULT_TARGETS)
        raise ValueError(f"{KEY}: {type(model).__name__} holds no backbone LoRA knows ({kinds})")
    chosen: dict[str, list[str]] = {}
    unmatched: dict[str, list[str]] = {}  # user pattern → backbones it matched nothing in
    for prefix, backbone, table in backbones:
        patterns = list(settings.targets) if settings.targets is not None else list(table.default)
        if settings.vision:
            patterns += table.vision
        for pattern, names in _chosen_layers(backbone, patterns).items():
            if names:
                chosen.setdefault(prefix, []).extend(names)
            else:
                unmatched.setdefault(pattern, []).append(type(backbone).__name__)
    user_patterns = set(settings.targets or [])
    misses = [p for p, kinds in unmatched.items() if p in user_patterns and len(kinds) == len(backbones)]
    if misses:
        example = _linear_names(backbones[0][1])[:6]
        raise ValueError(f"{KEY}.targets: {misses} match no linear layer of {type(model).__name__}'s backbone(s) "
                         f"(patterns match the end of a layer's name, e.g. {example}); fix the pattern or set "
                         "targets: null for the defaults")
    for prefix, backbone, table in backbones:
        names = sorted(set(chosen.get(prefix, [])))
        if names:  # exact names: peft takes a listed name as the whole module name
            inject_adapter_in_model(LoraConfig(r=settings.r, lora_alpha=settings.alpha, target_modules=names,
                                               lora_dropout=settings.dropout, bias="none"), backbone)
        # The base weights of every backbone freeze (one the targets miss too); only the adapters (and
        # the table's small extras) train.
        for name, p in backbone.named_parameters():
            adapter = ADAPTER_MARK in name
            p.requires_grad_(adapter or any(name_matches(k, name) for k in table.keep_trainable))
            if adapter and p.dtype in (torch.float16, torch.bfloat16):
                # peft makes adapters in the base weight's dtype; the optimizer must update them in
                # float32 (peft's layers cast their input to the adapter's dtype and back).
                p.data = p.data.float()
    _train_also(model, settings.train_also)


def _train_also(model: nn.Module, patterns: list[str]) -> None:
    missing = []
    for pattern in patterns:
        hits = [p for name, p in model.named_parameters() if _any_prefix_matches(pattern, name)]
        if not hits:
            missing.append(pattern)
        for p in hits:
            p.requires_grad_(True)
    if missing:
        raise ValueError(f"{KEY}.train_also: {missing} name no module or parameter of {type(model).__name__} "
                         "(patterns match the end of a dotted name, e.g. backbone.model.text_projection)")


def _any_prefix_matches(pattern: str, name: str) -> bool:
    parts = name.split(".")
    return any(name_matches(pattern, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W + (alpha/r)·B·A) and put the plain layer back in
    its place: the state dict has the keys of the model without LoRA again. The merged base weights
    stay frozen (merging is for export and evaluation). Returns the number of layers merged."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(layers)


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of a model without LoRA (or merged) renamed for ``model`` with adapters: each
    adapted layer's ``weight``/``bias`` become ``base_layer.weight``/``bias`` (the adapters keep their
    fresh values). Any other state dict comes back unchanged."""
    state = dict(state)
    if has_lora_weights(state):
        return state
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for p in ("weight", "bias"):
                plain = f"{name}.{p}"
                if plain in state:
                    state[f"{name}.base_layer.{p}"] = state.pop(plain)
    return state


def lora_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ADAPTER_MARK in n)
