"""False negatives: a candidate that is the same product as a row's positive is not a negative.

Every contrastive loss labels by position, so two rows of a batch with the same target product are
each other's negatives: the loss then pushes a query away from its own target's copy (for ProCIR's
L_doc, two identical pairs put a floor of log 2 under the loss). Each loss therefore takes, besides
its embeddings, the product key of every row and every candidate, and sets the logit of a candidate
with the row's key to -inf before the cross-entropy; the positive itself stays.

A product's key is ``stable_id("{dataset}--{product_id}")`` (the ``cir caption`` sidecar's spelling of
a product): the same number on every rank, so keys gather across ranks as integer tensors.
``ids=None`` everywhere means no masking, the old behaviour.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from datamodules.schema import stable_id


def product_key(dataset: str | None, product_id: str) -> int:
    """The integer identity of one product: (dataset, product id), the same in every process."""
    return stable_id(f"{dataset or ''}--{product_id}")


def product_keys(ids: Sequence[str], datasets: Sequence[str] | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Keys ``[N]`` of products given by id and dataset (no datasets: the same empty one for all)."""
    datasets = datasets if datasets is not None else [""] * len(ids)
    return torch.tensor([product_key(d, i) for d, i in zip(datasets, ids, strict=True)], dtype=torch.long,
                        device=device)


def batch_keys(batch: dict[str, Any], field: str = "target_id",
               device: torch.device | str | None = None) -> torch.Tensor | None:
    """Keys ``[B]`` of a triplet batch's targets (``field="source_id"``: its sources); None when the
    batch does not carry the ids (hand-made test batches), which switches masking off."""
    ids = batch.get(field)
    if ids is None:
        return None
    return product_keys(list(ids), batch.get("dataset"), device)


def negative_keys(batch: dict[str, Any], k: int, device: torch.device | str | None = None) -> torch.Tensor | None:
    """Keys ``[B, k]`` of a batch's mined negatives (``negative_ids``, mined in the triplet's own
    dataset; missing slots are "" and masked as missing anyway); None when the batch has no ids."""
    ids = batch.get("negative_ids")
    if ids is None:
        return None
    datasets = batch.get("dataset") or [""] * len(ids)
    rows = [[product_key(d, i) for i in (list(row) + [""] * k)[:k]] for d, row in zip(datasets, ids, strict=True)]
    return torch.tensor(rows, dtype=torch.long, device=device).view(len(ids), k)


def false_negative_mask(row_keys: torch.Tensor, candidate_keys: torch.Tensor,
                        positives: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N]``: True where candidate j is the same product as row i's positive, so it must not count
    as row i's negative. ``candidate_keys`` is ``[N]`` (one candidate list for every row, in-batch
    and bank) or ``[B, N]`` (per-row candidates, mined negatives); ``positives`` ``[B]`` is the
    column of each row's own positive, which always stays."""
    candidates = candidate_keys[None] if candidate_keys.ndim == 1 else candidate_keys
    same = row_keys[:, None] == candidates
    if positives is not None:
        same[torch.arange(len(row_keys), device=same.device), positives] = False
    return same


class CountsMaskedNegatives:
    """Mixin of a loss that masks false negatives: the masked and all negative entries it scored
    since the module last read them (``core.interfaces.MasksFalseNegatives``), so the module can log
    the share per step (``train/masked_negatives``). Counts stay tensors: no device sync per call."""

    _masked: torch.Tensor | int = 0
    _negatives: torch.Tensor | int = 0
    _counted: bool = False

    def mask_false_negatives(self, logits: torch.Tensor, mask: torch.Tensor, negatives: torch.Tensor | int,
                             expected: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` with the entries of ``mask`` at -inf, counting them out of ``negatives`` entries.
        ``expected``: masked entries that are no duplicate (the bank's own entry of a row's target,
        scored as the positive from the batch instead), masked but neither counted nor negatives."""
        counted = mask if expected is None else mask & ~expected
        self._masked = self._masked + counted.sum().detach()
        self._negatives = self._negatives + negatives - (0 if expected is None else expected.sum().detach())
        self._counted = True
        return logits.masked_fill(mask, -torch.inf)

    def pop_masked_negatives(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(masked entries, negative entries) since the last call, then reset; None if nothing was masked
        (no ids given)."""
        if not self._counted:
            return None
        out = torch.as_tensor(self._masked), torch.as_tensor(self._negatives)
        self._masked, self._negatives, self._counted = 0, 0, False
        return out


def id_kwargs(loss: object, ids: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """``{"ids": ids}`` for a loss whose ``forward`` takes them, else ``{}``: a contrastive loss of a
    user's own, written without false-negative masking, still trains (unmasked)."""
    forward = getattr(loss, "forward", loss)
    try:
        params = inspect.signature(forward).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}
    takes = "ids" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"ids": ids} if takes else {}
