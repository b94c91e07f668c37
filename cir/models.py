"""A trained model and its data from an experiment config, and a gallery embedded with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules import SyntheticDataModule
from datamodules.interfaces import RetrievalData
from datamodules.shards import MANIFEST
from lightning_modules.backbones.images import open_upright
from lightning_modules.core import Products, Retriever, load_weights, state_dict_of
from lightning_modules.core.adapters import LoraConfigured, apply_lora, has_lora_weights, merge_lora

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
    if isinstance(dm, SyntheticDataModule) and not (dm.data_dir / MANIFEST).is_file():
        dm.prepare_data()  # generated data is written on first use, as training writes it
    if not isinstance(dm, RetrievalData):
        raise SystemExit(f"{type(dm).__name__} does not serve galleries: use datamodules.ShardDataModule")
    if ckpt:
        load_weights_into(model, ckpt)
    model.eval()
    transform = model.image_transform()
    if transform is not None:
        dm.set_image_transform(transform)
    return model, dm


def load_weights_into(model: nn.Module, ckpt: str | Path) -> None:
    """The checkpoint's weights into the model built from the experiment. A checkpoint of a LoRA run
    holds adapters beside the base weights: the model gets its adapters (the experiment's
    ``model.init_args.lora``) before loading; a merged or plain one loads as it is."""
    state = state_dict_of(ckpt)
    if has_lora_weights(state):
        lora = model.lora if isinstance(model, LoraConfigured) else None
        if lora is None:
            raise SystemExit(f"{ckpt} holds LoRA adapters but the experiment has no model.init_args.lora: give the "
                             "experiment it was trained with, or merge it first (cir export --config EXP --ckpt "
                             f"{ckpt} --out merged.ckpt)")
        apply_lora(model, lora)
    model.load_state_dict(state)


def export_merged(configs: list[str], ckpt_in: str | Path, ckpt_out: str | Path, extra: list[str] | None = None) -> int:
    """A LoRA run's checkpoint with its adapters folded into the weights: a checkpoint with the keys of
    the model without LoRA, which any command (``lightning validate --ckpt_path``, ``init_checkpoint``)
    loads with the experiment's ``lora`` unset. Returns the number of adapted layers merged.

    The training state of the input (epoch, step, callbacks, hyperparameters) is kept; its optimizer
    and scheduler states are dropped: they hold the adapters' moments, which mean nothing to the merged
    weights."""
    model, _ = load_model_and_data(configs, str(ckpt_in), extra or [])
    merged = merge_lora(model)
    if not merged:
        raise SystemExit(f"{ckpt_in} holds no LoRA adapters: there is nothing to merge")
    checkpoint = load_weights(ckpt_in)
    if "state_dict" not in checkpoint:
        checkpoint = {}
    checkpoint = {k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "lr_schedulers")}
    checkpoint["state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and "lora" in hparams:
        checkpoint["hyper_parameters"] = {**hparams, "lora": None}
    Path(ckpt_out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, ckpt_out)
    return merged


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
    """A one-query triplet batch from image files (upright, as their EXIF orientation says),
    preprocessed as the model's data is."""
    views = [dm.image_transform(open_upright(p)) for p in images]
    # Tensor views stack into [1, V, 3, H, W]; Qwen's variable-size patch grids stay a list.
    return {"source_images": torch.stack(views)[None] if isinstance(views[0], torch.Tensor) else [views],
            "source_mask": torch.ones(1, len(images), dtype=torch.bool), "text": [text]}


@torch.no_grad()
def encode_query(model: Retriever, dm: RetrievalData, images: list[str], text: str) -> torch.Tensor:
    return model.encode_query(query_batch(dm, images, text)).float()
