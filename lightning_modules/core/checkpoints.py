"""Reading checkpoints safely, and initialising a model (or one of its parts) from one."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import ADAPTER_MARK, fit_state_dict, has_lora_weights


def load_weights(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused, it holds pickled Python objects and checkpoints are loaded weights-only "
            f"(a file from an untrusted source could run code). Re-save it as plain tensors. ({exc})".replace("\n", " ")
        ) from exc


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint read weights-only and memory-mapped: its epoch, step and run id cost no copy of
    the weights, which matters for a multi-GB model."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def state_dict_of(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning checkpoint or of a bare state dict."""
    state = load_weights(path)
    return state.get("state_dict", state)


def submodule_weights(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one submodule (``backbone.``, say) of a checkpoint, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state_dict_of(path).items() if k.startswith(prefix)}


def load_init_checkpoint(model: nn.Module, path: str | Path, writer_command: str, key: str) -> None:
    """Initialise ``model`` from a checkpoint of the same family and backbone (metric states aside).

    ``writer_command`` is the run that writes the file, named in the error when it is missing;
    ``key`` is the config key that points at it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist. It is written by `{writer_command}` (see the "
                                "experiment file that names this checkpoint).")
    state = state_dict_of(path)
    # A LoRA run may start from a checkpoint without adapters: its weights go under the adapters'
    # base layers, and the fresh adapters are not missing.
    missing, unexpected = model.load_state_dict(fit_state_dict(model, state), strict=False)
    fresh = not has_lora_weights(state)
    real_missing = [k for k in missing if not k.startswith(("recall.", "image_text."))
                    and not (fresh and ADAPTER_MARK in k)]
    if real_missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {real_missing[:5]}, unexpected "
                         f"{unexpected[:5]}; was it written by the same model family and backbone?")


def mlflow_run_id(loggers: list[Any]) -> str | None:
    """The MLflow run a module logs to, stored in its checkpoints so a resumed run logs into it."""
    from lightning.pytorch.loggers import MLFlowLogger

    return next((lg.run_id for lg in loggers if isinstance(lg, MLFlowLogger)), None)
