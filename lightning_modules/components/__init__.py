"""Plain ``nn.Module`` building blocks, injected through ``class_path``/``init_args``: fusion heads,
losses, the stage-2 target bank and multi-view pooling."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.lazy import lazy_namespace

if TYPE_CHECKING:
    from .bank import TargetBank
    from .bank_loss import StaticBankLoss
    from .fusion import Combiner, SumFusion, TransformerFusion
    from .hybrid_negatives import HybridNegativesLoss
    from .infonce import SymmetricInfoNCE
    from .mined_negatives import MinedNegativesLoss
    from .multiview import masked_mean, per_view_embeddings

_EXPORTS = {
    "Combiner": ".fusion",
    "HybridNegativesLoss": ".hybrid_negatives",
    "MinedNegativesLoss": ".mined_negatives",
    "StaticBankLoss": ".bank_loss",
    "SumFusion": ".fusion",
    "SymmetricInfoNCE": ".infonce",
    "TargetBank": ".bank",
    "TransformerFusion": ".fusion",
    "masked_mean": ".multiview",
    "per_view_embeddings": ".multiview",
}
__all__ = ["Combiner", "HybridNegativesLoss", "MinedNegativesLoss", "StaticBankLoss", "SumFusion",
           "SymmetricInfoNCE", "TargetBank", "TransformerFusion", "masked_mean", "per_view_embeddings"]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
