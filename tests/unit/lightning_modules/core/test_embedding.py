"""The one embedding path: what a loop gives back equals the model's own encoders called by hand,
the model's mode is restored, progress counts products, and --device refuses CUDA where there is none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.core import Products
from lightning_modules.core.embedding import embed_products, embed_queries, resolve_device


class Toy(nn.Module):
    """Mean of the views through a linear map; dropout so that train mode would change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def encode_target(self, products: Products) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        return self.drop(self.lin(products.images.mean(1)))

    def encode_query(self, batch: dict) -> torch.Tensor:
        return self.drop(self.lin(batch["source_images"].mean(1))) + len(batch["text"][0])


class Count:
    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


def _gallery(seed: int, sizes: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out, k = [], 0
    for size in sizes:
        ids = [f"p{k + i}" for i in range(size)]
        k += size
        out.append({"images": torch.randn(size, 2, 4, generator=g), "mask": torch.ones(size, 2, dtype=torch.bool),
                    "product_id": ids, "dataset": ["d"] * size,
                    "meta": [{"product_id": i, "raw_id": f"raw/{i}", "dataset": "d"} for i in ids]})
    return out


def test_products_equal_the_encoder_by_hand_in_eval_mode_and_the_mode_is_restored() -> None:
    torch.manual_seed(0)
    model = Toy().train()
    batches = _gallery(1, [3, 2, 4])
    progress = Count()
    out = embed_products(model, batches, progress=progress)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model.lin(b["images"].mean(1)) for b in batches])
    assert torch.equal(out.embeddings, expected)  # no dropout: evaluated in eval mode
    assert out.product_ids == [f"p{i}" for i in range(9)] and out.raw_ids == [f"raw/p{i}" for i in range(9)]
    assert progress.n == 9 and out.embeddings.dtype == torch.float32


def test_queries_and_an_empty_gallery() -> None:
    model = Toy()
    batch = {"source_images": torch.ones(2, 1, 4), "text": ["ab", "ab"]}
    (emb, seen), = list(embed_queries(model, [batch]))
    model.eval()
    with torch.no_grad():
        assert torch.equal(emb, model.lin(torch.ones(2, 4)) + 2)
    assert seen is batch
    with pytest.raises(ValueError, match="no products to embed"):
        embed_products(model, [])


def test_device_choice() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA device"):
            resolve_device("cuda")
