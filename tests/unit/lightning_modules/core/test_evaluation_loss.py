"""``evaluation.loss``: evaluation embeds the query batches' targets (for ``val/loss``) only when asked;
Recall@K needs only the gallery's embeddings."""

from __future__ import annotations

import pytest
import torch

from lightning_modules import CLIP4CIR
from lightning_modules.backbones import CLIPBackbone
from lightning_modules.core import Products, RetrievalEval


def _queries(n: int = 3) -> dict:
    return {"source_images": torch.randn(n, 1, 3, 64, 64), "source_mask": torch.ones(n, 1, dtype=torch.bool),
            "target_images": torch.randn(n, 1, 3, 64, 64), "target_mask": torch.ones(n, 1, dtype=torch.bool),
            "text": ["make it red"] * n, "target_id": ["a", "b", "c"][:n], "source_id": ["s", "t", "u"][:n],
            "dataset": ["gen"] * n, "meta": [{}] * n}


@pytest.mark.parametrize("loss", [False, True])
def test_val_loss_only_when_asked(loss: bool) -> None:
    torch.manual_seed(0)
    model = CLIP4CIR(CLIPBackbone("tiny"), evaluation=RetrievalEval(loss=loss)).eval()
    calls: list[int] = []
    encode = model.encode_target

    def counted(products: Products) -> torch.Tensor:
        calls.append(len(products))
        return encode(products)

    model.encode_target = counted
    logged: list[str] = []
    model.log = lambda name, value, **kw: logged.append(name)
    with torch.no_grad():
        model.validation_step(_queries(), 0, dataloader_idx=1)
    assert calls == ([3] if loss else [])
    assert ("val/loss" in logged) == loss
    assert model.recall["val"].update_called  # Recall@K got the queries either way


def test_the_default_is_off() -> None:
    assert RetrievalEval().loss is False
