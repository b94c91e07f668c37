"""Model code of fashion-cir: the core, building blocks, retrieval, backbones and one package per
family. The classes that configs name by ``class_path`` are re-exported here."""

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

__all__ = ["CLIP4CIR", "Combiner", "CosineSchedule", "HybridNegativesLoss", "LLaVACaptionCIR", "MLLMEmbedder",
           "MinedNegativesLoss", "ProCIR", "ProCIRSFT", "Products", "RecallAtK", "RetrievalEval", "RetrievalModule",
           "SPRC", "StaticBankLoss", "SumFusion", "SymmetricInfoNCE", "TransformerFusion"]
