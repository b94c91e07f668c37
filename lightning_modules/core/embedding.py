"""One way to embed products and queries, used by every caller.

Evaluation (``GalleryEvaluation.evaluation_step``), ``lightning predict`` (``predict_step``, the
catalogue exporter), the stage-2 target bank, ``cir mine-negatives``, ``cir index``, ``cir search``,
``cir query`` and ``cir serve`` all embed a gallery batch through ``embed_product_batch`` and a
query batch through ``embed_query_batch``, so a product has the same vector wherever it is embedded
(the tests compare the exported vectors with evaluation's). The loops here add what a caller outside
the Trainer needs: eval mode, no gradients, the batch on the model's device, autocast to a lower
precision where asked, float32 CPU results, and progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from datamodules.interfaces import ProgressSink

from .contract import Products


class Encoders(Protocol):
    """The two encoders of a ``Retriever`` (``interfaces``), all this module calls; declared here
    because ``interfaces`` imports evaluation, which embeds through this module."""

    def encode_target(self, products: Products) -> torch.Tensor: ...

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor: ...


def embed_product_batch(model: Encoders, batch: dict[str, Any]) -> torch.Tensor:
    """A gallery batch (``images``, ``mask``, ``meta``) as the model's target encoder embeds it:
    ``[B, D]``, or ``[B, V, D]`` for a multi-vector model."""
    return model.encode_target(Products.gallery_of(batch))


def embed_query_batch(model: Encoders, batch: dict[str, Any]) -> torch.Tensor:
    """A query batch (source views and text) as the model's query encoder embeds it."""
    return model.encode_query(batch)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto``/None: CUDA when there is one, else CPU. ``cuda`` without CUDA is refused in one line
    (a silent fallback would run a GPU-sized job for hours on the CPU)."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device torch can use; use --device cpu "
                         "(or auto)")
    return device


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to ``dtype`` on ``device`` (None or float32: full precision)."""
    if dtype in (None, torch.float32):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: Encoders) -> torch.device:
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def place(model: Encoders, device: str | torch.device | None) -> torch.device:
    """Moves the model to ``device`` (resolved as ``resolve_device`` does) in eval mode."""
    target = resolve_device(device)
    if isinstance(model, torch.nn.Module):
        model.to(target).eval()
    return target


@contextmanager
def inference(model: Encoders, device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode, no gradients and autocast for the loops below; the model's mode is restored after."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad(), autocast_for(device, dtype):
            yield
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)


@dataclass
class Embedded:
    """Embedded products: float32 CPU rows and, per row, the ids and the shard metadata."""

    embeddings: torch.Tensor  # [N, D] or [N, V, D]
    product_ids: list[str] = field(default_factory=list)  # the ids our shards use
    raw_ids: list[str] = field(default_factory=list)  # the dataset's own ids (FashionIQ image names, ...)
    datasets: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)


def iter_product_embeddings(model: Encoders, batches: Iterable[dict[str, Any]], device: torch.device | None = None,
                            dtype: torch.dtype | None = None, progress: ProgressSink | None = None,
                            transfer: Callable[[dict[str, Any], torch.device], dict[str, Any]] | None = None,
                            ) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """(embedding, batch) per gallery batch, embedded on ``device`` (default: the model's) without
    gradients and in eval mode (the mode is restored after the last batch). ``transfer`` moves a
    batch (default: every tensor in it); a LightningModule passes its own hook."""
    device = device or model_device(model)
    move = transfer or move_data_to_device
    with inference(model, device, dtype):
        for batch in batches:
            emb = embed_product_batch(model, move(batch, device))
            if progress is not None:
                progress.update(len(batch["meta"]))
            yield emb, batch


def embed_products(model: Encoders, batches: Iterable[dict[str, Any]], device: torch.device | None = None,
                   dtype: torch.dtype | None = None, progress: ProgressSink | None = None) -> Embedded:
    """Every product of ``batches`` (a gallery loader): float32 CPU embeddings, ids and metadata."""
    out = Embedded(torch.empty(0))
    chunks = []
    for emb, batch in iter_product_embeddings(model, batches, device, dtype, progress):
        chunks.append(emb.float().cpu())
        out.product_ids += list(batch["product_id"])
        out.raw_ids += [m.get("raw_id") or m["product_id"] for m in batch["meta"]]
        out.datasets += list(batch["dataset"])
        out.metas += list(batch["meta"])
    if not chunks:
        raise ValueError("no products to embed: the gallery is empty")
    out.embeddings = torch.cat(chunks)
    return out


def embed_queries(model: Encoders, batches: Iterable[dict[str, Any]], device: torch.device | None = None,
                  dtype: torch.dtype | None = None, progress: ProgressSink | None = None,
                  ) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """(float32 CPU embedding, batch) per query batch, embedded as ``iter_product_embeddings`` does."""
    device = device or model_device(model)
    with inference(model, device, dtype):
        for batch in batches:
            emb = embed_query_batch(model, move_data_to_device(batch, device)).float().cpu()
            if progress is not None:
                progress.update(len(batch["text"]))
            yield emb, batch
