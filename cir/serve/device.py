"""Where ``cir serve`` runs its model, and in which precision (``--device``, ``--dtype``).

``auto`` picks CUDA when torch sees one. The precision is float32 on the CPU; on CUDA ``auto``
computes in bf16 (autocast over the weights as loaded, which is how the experiments train on a
GPU: ``bf16-mixed``) when the GPU supports it and the experiment allows it, i.e. its trainer
precision is bf16 or its backbone's weights are already bf16; otherwise float32. Query and product
embeddings always leave the model as float32 CPU rows, whatever the device and precision.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.core.embedding import resolve_device

from ..lightning_cli import config_tree, expand_defaults

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def device_of(name: str, prog: str) -> torch.device:
    """``--device`` resolved, or the command ended in one line (``cuda`` without CUDA)."""
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"{prog}: {exc}") from None


def trainer_precision(configs: list[str], extra: list[str]) -> str:
    """The experiment's ``trainer.precision`` (its config files, then a ``--trainer.precision``
    override after ``--``); "" when none is set."""
    args = [a for c in configs for a in ("--config", c)]
    tree = config_tree(expand_defaults(args))
    precision = str((tree.get("trainer") or {}).get("precision") or "")
    for i, arg in enumerate(extra):
        if arg.startswith("--trainer.precision="):
            precision = arg.split("=", 1)[1]
        elif arg == "--trainer.precision" and i + 1 < len(extra):
            precision = extra[i + 1]
    return precision


def allows_bf16(model: torch.nn.Module, precision: str) -> bool:
    return precision.startswith("bf16") or any(p.dtype == torch.bfloat16 for p in model.parameters())


def dtype_of(name: str, device: torch.device, model: torch.nn.Module, precision: str, prog: str) -> torch.dtype:
    """``--dtype`` resolved for ``device`` (see the module's doc); bf16 asked of a GPU without it is refused."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported() and allows_bf16(model, precision):
            return torch.bfloat16
        return torch.float32
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"{prog}: --dtype bfloat16: this GPU has no bf16 support; use --dtype float32 (or auto)")
    return dtype


def place(model: Any, device: torch.device, dtype: torch.dtype) -> None:
    """The model on ``device`` in eval mode. For float32 its weights are float32 (a backbone loaded in
    bf16 is widened); for bf16 they stay as loaded and autocast computes in bf16."""
    if not isinstance(model, torch.nn.Module):
        return
    if dtype == torch.float32 and any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    model.to(device).eval()
