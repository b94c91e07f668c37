"""Named backbone presets: ``tiny`` (random weights, built from config) and the real checkpoints.

A preset is either built from ``config`` with random weights (``hub_id`` is None: tests, demos,
random-weight benchmarks) or loaded from ``hub_id``. Anything that is not a preset name is taken
as a hub id or a local folder saved with ``save_pretrained``.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from huggingface_hub import try_to_load_from_cache

Family = Literal["clip", "qwen3.5", "qwen3-vl-embedding", "gme", "blip2"]


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    family: Family
    hub_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    description: str = ""
    # How a zero-shot embedder is prompted and pooled, by model card (``backbones.vl_embedder.CARDS``);
    # empty for the other families.
    card: str = ""

    @property
    def random_init(self) -> bool:
        return self.hub_id is None


PRESETS: dict[Family, dict[str, BackbonePreset]] = {
    "clip": {
        "tiny": BackbonePreset(
            name="tiny", family="clip", image_size=64,
            config={
                "text": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "max_position_embeddings": 160},
                "vision": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 64, "patch_size": 8},
                "projection_dim": 48,
            },
            description="2-layer, width-48 CLIP with random weights and the generated-vocabulary tokenizer",
        ),
        "clip-vit-b32": BackbonePreset(
            name="clip-vit-b32", family="clip", hub_id="openai/clip-vit-base-patch32", image_size=224,
            description="OpenAI CLIP ViT-B/32 (512-d embeddings)",
        ),
    },
    "qwen3.5": {
        "tiny": BackbonePreset(
            name="tiny", family="qwen3.5", image_size=128,
            config={
                # One linear-attention (Gated DeltaNet) and one full-attention layer: the smallest
                # model that exercises both cache kinds of the real one.
                "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "layer_types": ["linear_attention", "full_attention"],
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                         "linear_num_key_heads": 2, "linear_num_value_heads": 2,
                         "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
                         "max_position_embeddings": 4096,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                             "mrope_interleaved": True}},
                "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                           "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                           "out_hidden_size": 64, "num_position_embeddings": 256},
            },
            description="2-layer (linear + full attention), width-64 Qwen3.5 with a 2-block vision tower, "
                        "random weights and the generated-vocabulary tokenizer",
        ),
        "qwen3.5-0.8b": BackbonePreset(
            name="qwen3.5-0.8b", family="qwen3.5", hub_id="Qwen/Qwen3.5-0.8B", image_size=512,
            description="Qwen3.5-0.8B (24 layers, 1024-d embeddings at <emb_all>); bf16 on GPU",
        ),
        "procir-released": BackbonePreset(
            name="procir-released", family="qwen3.5", hub_id="yuandaxia/ProCIR", image_size=512,
            description="the FashionMV release's ProCIR checkpoint (Qwen3.5-0.8B, its tokenizer holds <emb_all>)",
        ),
        "qwen3.5-0.8b-random": BackbonePreset(
            name="qwen3.5-0.8b-random", family="qwen3.5", image_size=512,
            config={
                # Qwen3.5-0.8B's published architecture (../shared/notes), random weights: for speed
                # and memory benchmarks where the weights cannot be downloaded.
                "text": {"vocab_size": 248320, "hidden_size": 1024, "intermediate_size": 3584,
                         "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2,
                         "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
                         "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
                         "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                             "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
                                             "mrope_interleaved": True}},
                "vision": {"depth": 12, "hidden_size": 768, "patch_size": 16, "spatial_merge_size": 2,
                           "temporal_patch_size": 2, "out_hidden_size": 1024},
            },
            description="Qwen3.5-0.8B's architecture with random weights (benchmarks only)",
        ),
    },
    "qwen3-vl-embedding": {
        "tiny": BackbonePreset(
            name="tiny", family="qwen3-vl-embedding", card="qwen3-vl-embedding",
            config={
                "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                         "max_position_embeddings": 4096,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                             "mrope_section": [2, 3, 3], "mrope_interleaved": True}},
                "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                           "out_hidden_size": 64, "num_position_embeddings": 16, "deepstack_visual_indexes": [1],
                           "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
                # Small views keep the tiny model fast: 4 to 16 image tokens per view.
                "image": {"min_pixels": 32 * 32, "max_pixels": 128 * 128},
            },
            description="2-layer, width-64 Qwen3-VL (with a DeepStack layer) and random weights, prompted and "
                        "pooled as Qwen3-VL-Embedding",
        ),
        "qwen3-vl-embedding-2b": BackbonePreset(
            name="qwen3-vl-embedding-2b", family="qwen3-vl-embedding", card="qwen3-vl-embedding",
            hub_id="Qwen/Qwen3-VL-Embedding-2B", description="Qwen3-VL-Embedding-2B (2048-d); bf16 on GPU",
        ),
        "qwen3-vl-embedding-8b": BackbonePreset(
            name="qwen3-vl-embedding-8b", family="qwen3-vl-embedding", card="qwen3-vl-embedding",
            hub_id="Qwen/Qwen3-VL-Embedding-8B", description="Qwen3-VL-Embedding-8B (4096-d); bf16 on GPU",
        ),
        "qwen3-vl-embedding-8b-random": BackbonePreset(
            name="qwen3-vl-embedding-8b-random", family="qwen3-vl-embedding", card="qwen3-vl-embedding",
            config={
                # Qwen3-VL-8B's published architecture with random weights: memory and speed
                # measurements of the 8B embedder where the weights cannot be downloaded.
                "text": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                         "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "head_dim": 128, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                             "mrope_section": [24, 20, 20], "mrope_interleaved": True}},
                "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                           "out_hidden_size": 4096, "num_position_embeddings": 2304,
                           "deepstack_visual_indexes": [8, 16, 24], "patch_size": 16, "spatial_merge_size": 2,
                           "temporal_patch_size": 2},
            },
            description="Qwen3-VL-Embedding-8B's architecture with random weights (benchmarks only)",
        ),
    },
    "gme": {
        "tiny": BackbonePreset(
            name="tiny", family="gme", card="gme",
            config={
                "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                             "mrope_section": [2, 3, 3]}},
                "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64, "mlp_ratio": 2,
                           "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
                "image": {"min_pixels": 28 * 28, "max_pixels": 112 * 112},
            },
            description="2-layer, width-64 Qwen2-VL with random weights, prompted and pooled as GME",
        ),
        "gme-qwen2-vl-2b": BackbonePreset(
            name="gme-qwen2-vl-2b", family="gme", card="gme", hub_id="Alibaba-NLP/gme-Qwen2-VL-2B-Instruct",
            description="GME on Qwen2-VL-2B (1536-d); bf16 on GPU",
        ),
        "gme-qwen2-vl-7b": BackbonePreset(
            name="gme-qwen2-vl-7b", family="gme", card="gme", hub_id="Alibaba-NLP/gme-Qwen2-VL-7B-Instruct",
            description="GME on Qwen2-VL-7B (3584-d); bf16 on GPU",
        ),
        "rzenembed-8b": BackbonePreset(
            name="rzenembed-8b", family="gme", card="rzenembed", hub_id="qihoo360/RzenEmbed",
            description="RzenEmbed (Qwen2-VL architecture, 8B): GME's recipe with the instruction in the user turn",
        ),
    },
    "blip2": {
        "tiny": BackbonePreset(
            name="tiny", family="blip2", image_size=64,
            config={
                # Weights drawn with std 0.2 everywhere: BERT's 0.02 suits width 768 (0.02·√768 ≈ 0.55
                # per linear map); at width 48 every map would shrink its input ~7× and the image would
                # drown in the query tokens' residual stream, a model that cannot start learning.
                # (transformers' vision default, 1e-10, is a placeholder for loaded weights.)
                "vision": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 64, "patch_size": 8, "initializer_range": 0.2},
                # Cross-attention in every layer (the real one: every other), so two layers still see
                # the image twice; 128 positions hold CLIP-length texts (77) plus SPRC's prompt tokens.
                # No dropout: at this width BERT's 0.1 drowns what a random model starts from (measured:
                # with it, tiny SPRC's in-batch loss never leaves ln(batch size)).
                "qformer": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "cross_attention_frequency": 1,
                            "max_position_embeddings": 128, "use_qformer_text_input": True,
                            "initializer_range": 0.2, "hidden_dropout_prob": 0.0,
                            "attention_probs_dropout_prob": 0.0},
                "num_query_tokens": 8,
                "image_text_hidden_size": 48,
                "initializer_range": 0.2,
            },
            description="2-layer, width-48 BLIP-2 (ViT and Q-Former, 8 query tokens) with random weights and the "
                        "generated-vocabulary tokenizer",
        ),
        "blip2-itm-vit-g": BackbonePreset(
            name="blip2-itm-vit-g", family="blip2", hub_id="Salesforce/blip2-itm-vit-g", image_size=224,
            description="BLIP-2 ViT-g with its image-text retrieval Q-Former (32 query tokens, 256-d features)",
        ),
    },
}


def get_preset(family: Family, name: str) -> BackbonePreset | None:
    """The preset called ``name`` for ``family``, or None when ``name`` is a hub id or a path."""
    return PRESETS.get(family, {}).get(name)


def preset_names(family: Family) -> list[str]:
    return sorted(PRESETS.get(family, {}))


def checkpoint_source(family: Family, name_or_path: str) -> str:
    """What ``from_pretrained`` loads for ``name_or_path``: a preset's hub id, a folder, or a hub id;
    anything else is a clear error listing the presets. A hub id that can be neither downloaded
    (offline, or the hub unreachable) nor found in the local cache fails here, at once, instead of
    after the hub client's retries."""
    preset = get_preset(family, name_or_path)
    source = preset.hub_id if preset is not None else name_or_path
    if Path(source).exists():
        return source
    if source.count("/") != 1:
        raise ValueError(
            f"{family} backbone {source!r} is neither a preset ({', '.join(preset_names(family))}), "
            "an existing folder, nor a hub id of the form 'org/name'."
        )
    require_hub_source(source, f"{family} backbone")
    return source


def require_hub_source(source: str, what: str) -> None:
    """A hub id that can be neither downloaded nor found in the local cache is an error now, with
    the fix, not after the hub client's retries; folders pass."""
    if Path(source).exists() or hub_reachable() or isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub ({hub_endpoint()}) cannot be reached"
    raise OSError(f"{what} {source!r}: {why} and it is not in the local Hugging Face cache. Download it where "
                  f"there is network (`hf download {source} --local-dir DIR`) and pass the folder (or any written "
                  "with save_pretrained) instead.")


def hub_kwargs(source: str) -> dict[str, Any]:
    """``from_pretrained`` options: cached files only when the hub cannot be reached."""
    return {} if Path(source).exists() or hub_reachable() else {"local_files_only": True}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.cache
def _reachable(endpoint: str, timeout: float) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection within ``timeout`` (checked once per endpoint).
    Behind a proxy the direct connection says nothing: the hub client is trusted to get through."""
    if hub_offline():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    return _reachable(hub_endpoint(), timeout)


def load_error(what: str, source: str, exc: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return OSError(
        f"could not load {what} from {source!r} ({type(exc).__name__}: {exc}). "
        f"{'HF_HUB_OFFLINE=1 is set, so hub ids resolve only from the local cache. ' if offline else ''}"
        "Give a local folder written with save_pretrained (model, tokenizer and preprocessor), "
        "or a hub id on a machine with network access."
    )
