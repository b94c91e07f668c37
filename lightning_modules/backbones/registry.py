"""Named backbone presets: ``tiny`` (random weights, built from config) and the real checkpoints.

A preset is either built from ``config`` with random weights (``hub_id`` is None: tests, demos,
random-weight benchmarks) or loaded from ``hub_id``. Anything that is not a preset name is taken
as a hub id or a local folder saved with ``save_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["clip", "qwen3.5"]


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    family: Family
    hub_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    description: str = ""

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
}


def get_preset(family: Family, name: str) -> BackbonePreset | None:
    """The preset called ``name`` for ``family``, or None when ``name`` is a hub id or a path."""
    return PRESETS.get(family, {}).get(name)


def preset_names(family: Family) -> list[str]:
    return sorted(PRESETS.get(family, {}))
