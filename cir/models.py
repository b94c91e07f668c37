"""A trained model and its data from an experiment config, and a gallery embedded with it."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from datamodules.interfaces import RetrievalData
from lightning_modules.core import Products, Retriever, state_dict_of

from .lightning_cli import build_cli


def load_model_and_data(configs: list[str], ckpt: str | None, extra: list[str]) -> tuple[Retriever, RetrievalData]:
    """The experiment's model with the checkpoint's weights (weights-only), in eval mode, and its
    DataModule with the backbone's preprocessing."""
    args = [a for c in configs for a in ("--config", c)] + ["--trainer.logger=false", *extra]
    cli = build_cli(args, run=False)
    model, dm = cli.model, cli.datamodule
    if not isinstance(model, Retriever):
        raise SystemExit(f"{type(model).__name__} is not a retrieval model (it has no encode_query/encode_target): "
                         "give the experiment of a trained CIR model")
    if not isinstance(dm, RetrievalData):
        raise SystemExit(f"{type(dm).__name__} does not serve galleries: use datamodules.ShardDataModule")
    if ckpt:
        model.load_state_dict(state_dict_of(ckpt))
    model.eval()
    transform = model.image_transform()
    if transform is not None:
        dm.set_image_transform(transform)
    return model, dm


@torch.no_grad()
def encode_gallery(model: Retriever, dm: RetrievalData, split: str) -> tuple[torch.Tensor, list[str], list[str]]:
    """Every gallery product of ``split``: embeddings, the dataset's own ids, dataset names."""
    embs, ids, datasets = [], [], []
    for batch in dm.eval_dataloaders(split)[0]:
        embs.append(model.encode_target(Products.gallery_of(batch)).float())
        ids += [m.get("raw_id") or m["product_id"] for m in batch["meta"]]
        datasets += batch["dataset"]
    return torch.cat(embs), ids, datasets


def query_batch(dm: RetrievalData, images: list[str], text: str) -> dict[str, Any]:
    """A one-query triplet batch from image files, preprocessed as the model's data is."""
    views = [dm.image_transform(Image.open(p).convert("RGB")) for p in images]
    # Tensor views stack into [1, V, 3, H, W]; Qwen's variable-size patch grids stay a list.
    return {"source_images": torch.stack(views)[None] if isinstance(views[0], torch.Tensor) else [views],
            "source_mask": torch.ones(1, len(images), dtype=torch.bool), "text": [text]}


@torch.no_grad()
def encode_query(model: Retriever, dm: RetrievalData, images: list[str], text: str) -> torch.Tensor:
    return model.encode_query(query_batch(dm, images, text)).float()
