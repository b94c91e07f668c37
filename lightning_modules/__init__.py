"""Model code of fashion-cir: the core, building blocks, retrieval, backbones and one package per
family. The classes that configs name by ``class_path`` are re-exported here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.lazy import lazy_namespace

if TYPE_CHECKING:
    from .components import (
        Combiner,
        HybridNegativesLoss,
        MinedNegativesLoss,
        StaticBankLoss,
        SumFusion,
        SymmetricInfoNCE,
        TransformerFusion,
    )
    from .core import CosineSchedule, Products, RetrievalEval, RetrievalModule
    from .families.clip4cir import CLIP4CIR
    from .families.llava_caption import LLaVACaptionCIR
    from .families.mllm_embed import MLLMEmbedder
    from .families.procir import ProCIR, ProCIRSFT
    from .families.sprc import SPRC
    from .retrieval import RecallAtK

_EXPORTS = {
    "CLIP4CIR": ".families.clip4cir",
    "Combiner": ".components",
    "CosineSchedule": ".core",
    "HybridNegativesLoss": ".components",
    "LLaVACaptionCIR": ".families.llava_caption",
    "MLLMEmbedder": ".families.mllm_embed",
    "MinedNegativesLoss": ".components",
    "ProCIR": ".families.procir",
    "ProCIRSFT": ".families.procir",
    "Products": ".core",
    "RecallAtK": ".retrieval",
    "RetrievalEval": ".core",
    "RetrievalModule": ".core",
    "SPRC": ".families.sprc",
    "StaticBankLoss": ".components",
    "SumFusion": ".components",
    "SymmetricInfoNCE": ".components",
    "TransformerFusion": ".components",
}
__all__ = ["CLIP4CIR", "Combiner", "CosineSchedule", "HybridNegativesLoss", "LLaVACaptionCIR", "MLLMEmbedder",
           "MinedNegativesLoss", "ProCIR", "ProCIRSFT", "Products", "RecallAtK", "RetrievalEval", "RetrievalModule",
           "SPRC", "StaticBankLoss", "SumFusion", "SymmetricInfoNCE", "TransformerFusion"]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
