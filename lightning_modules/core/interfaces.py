"""What the layers above may call on a model, declared once (``typing.Protocol``), instead of
``hasattr`` probes scattered over callbacks and commands.

``isinstance(x, Protocol)`` on these runtime-checkable protocols checks that the members exist;
the signatures are the contract that type checkers and readers hold the implementations to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..components.bank import TargetBank
from .contract import Products
from .evaluation import RetrievalEval


@runtime_checkable
class DistributedLoss(Protocol):
    """A loss that talks to other ranks. The module calls ``set_distributed`` in ``setup`` on every
    submodule that has it, so rank and world size never appear in a user's config."""

    def set_distributed(self, rank: int, world_size: int) -> None: ...


@runtime_checkable
class MasksFalseNegatives(Protocol):
    """A loss that masks false negatives (candidates that are the row's positive product again,
    ``components.false_negatives``) and counts them. The module reads and resets the counts once
    per step, over every such loss, and logs the share as ``train/masked_negatives``."""

    def pop_masked_negatives(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...


@runtime_checkable
class Tempered(Protocol):
    """A loss with a (possibly learnable) temperature, logged as ``train/temperature``."""

    @property
    def temperature(self) -> float: ...


@runtime_checkable
class Variants(Protocol):
    """Any LightningModule that names the mechanisms it has on or off (MLflow ``variant.*`` tags,
    the columns of ``cir compare``)."""

    def variant_switches(self) -> dict[str, bool | str]: ...


@runtime_checkable
class Described(Protocol):
    """A model that says what it is for comparison tables: its name (family and backbone), its
    parameter count and how it embeds multi-view products (MLflow tags ``model``, ``parameters``,
    ``strategy``; the rows of ``cir compare --layout table2``)."""

    def describe(self) -> dict[str, str]: ...


@runtime_checkable
class Retriever(Variants, Protocol):
    """A trained CIR model as callbacks, ``cir search``, ``cir query`` and services use it."""

    evaluation: RetrievalEval
    dataset_names: list[str]
    last_gallery: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor: ...

    def encode_target(self, products: Products) -> torch.Tensor: ...

    def image_transform(self) -> Any | None: ...


@runtime_checkable
class TwoStage(Protocol):
    """A model that ``callbacks.StageSwitch`` can move from stage 1 to stage 2."""

    training_stage: int
    bank: TargetBank | None

    def enter_stage2(self) -> None: ...

    def build_bank(self, gallery_batches: Iterable[dict[str, Any]], hard_negatives: int = 8) -> TargetBank: ...

    def target_encoder(self) -> list[nn.Module]: ...
