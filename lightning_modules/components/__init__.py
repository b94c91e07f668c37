"""Plain ``nn.Module`` building blocks, injected through ``class_path``/``init_args``: fusion heads,
losses, the stage-2 target bank and multi-view pooling."""

from .bank import TargetBank
from .bank_loss import StaticBankLoss
from .fusion import Combiner, SumFusion, TransformerFusion
from .hybrid_negatives import HybridNegativesLoss
from .infonce import SymmetricInfoNCE
from .mined_negatives import MinedNegativesLoss
from .multiview import masked_mean, per_view_embeddings

__all__ = ["Combiner", "HybridNegativesLoss", "MinedNegativesLoss", "StaticBankLoss", "SumFusion", "SymmetricInfoNCE",
           "TargetBank", "TransformerFusion", "masked_mean", "per_view_embeddings"]
