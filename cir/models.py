"""A trained model and its data from an experiment config, and a gallery embedded with it.

A command that answers queries needs trained weights: ``require_weights`` refuses to run without
``--ckpt`` unless ``--untrained`` says that the experiment's initial weights are meant (a random
model answers with plausible-looking scores). ``load_with_fingerprint`` also returns the model's
fingerprint, the fields that decide which vector space its embeddings live in (``FINGERPRINT``);
a saved index records it, and ``fingerprint_mismatch`` refuses a query from another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError
from torch import nn

from datamodules import SyntheticDataModule
from datamodules.atomic import write_json_atomic
from datamodules.interfaces import RetrievalData
from datamodules.shards import MANIFEST
from datamodules.transform_identity import NOT_EMBEDDING, describe_transform
from lightning_modules.backbones.images import open_upright
from lightning_modules.core import Retriever, load_weights, state_dict_of
from lightning_modules.core.adapters import LoraConfigured, apply_lora, has_lora_weights, merge_lora
from lightning_modules.core.embedding import embed_products, embed_queries, resolve_device

from .errors import check_files, debug_requested, one_line
from .lightning_cli import build_cli, checkpoint_class_mismatch
from .progress import Progress

# What a fingerprint records, in the order a mismatch names them.
FINGERPRINT = ("family", "model_config", "checkpoint", "preprocessing", "image_transform", "normalisation")
REBUILD = "cir search build --config EXP --ckpt CKPT --out DIR"  # named when an index cannot be queried


def require_weights(prog: str, ckpt: str | None, untrained: bool, missing_hint: str = "") -> None:
    """One line, before any model is built, unless exactly one of ``--ckpt FILE`` / ``--untrained``."""
    if ckpt and untrained:
        raise SystemExit(f"{prog}: --ckpt and --untrained exclude each other: give one")
    if not ckpt and not untrained:
        raise SystemExit(f"{prog}: no --ckpt: give the trained model's checkpoint (--ckpt PATH), or --untrained "
                         "to answer with the experiment's initial (untrained) weights")
    if ckpt and not Path(ckpt).is_file():
        raise SystemExit(f"{prog}: --ckpt {ckpt}: no such file" + (f"; {missing_hint}" if missing_hint else ""))


def command_name() -> str | None:
    """The command being run (``cir query``…: the dispatcher names it in ``sys.argv[0]``), for
    messages; None for a library caller, which gets exceptions rather than one-line exits."""
    return sys.argv[0] if sys.argv and sys.argv[0].startswith("cir ") else None


def load_model_and_data(configs: list[str], ckpt: str | None, extra: list[str],
                        prog: str | None = None) -> tuple[Retriever, RetrievalData]:
    """The experiment's model with the checkpoint's weights (weights-only), in eval mode, and its
    DataModule with the backbone's preprocessing. ``prog`` names the command in a one-line error
    (default: ``command_name()``)."""
    model, dm, _ = _load(configs, ckpt, extra, prog)
    return model, dm


def load_with_fingerprint(configs: list[str], ckpt: str | None, extra: list[str],
                          needs_data: bool = True) -> tuple[Retriever, RetrievalData, dict[str, str]]:
    """``load_model_and_data`` plus the model's fingerprint (``model_fingerprint``). With
    ``needs_data=False`` the DataModule only preprocesses: its shard folder need not exist and
    generated data is not written."""
    model, dm, cli = _load(configs, ckpt, extra, needs_data=needs_data)
    config = cli.config["model"]
    config = config.as_dict() if hasattr(config, "as_dict") else config
    return model, dm, model_fingerprint(model, dm.image_transform, config, ckpt, cli.config.get("seed_everything"))


def _load(configs: list[str], ckpt: str | None, extra: list[str], prog: str | None = None,
          needs_data: bool = True) -> tuple[Retriever, RetrievalData, Any]:
    prog = prog or command_name()
    if prog:  # every file named, before the model is built (its fragments and shard folder: build_cli)
        check_files(prog, [("--config", c) for c in configs] + [("--ckpt", ckpt)])
    args = [a for c in configs for a in ("--config", c)] + ["--trainer.logger=false", *extra]
    cli = build_cli(args, run=False, prog=prog, needs_data=needs_data)
    model, dm = cli.model, cli.datamodule
    if not isinstance(model, Retriever):
        raise SystemExit(f"{type(model).__name__} is not a retrieval model (it has no encode_query/encode_target): "
                         "give the experiment of a trained CIR model")
    if needs_data and isinstance(dm, SyntheticDataModule) and not (dm.data_dir / MANIFEST).is_file():
        dm.prepare_data()  # generated data is written on first use, as training writes it
    # Without data only the preprocessing is read: the Protocol check would read the manifest.
    serves = isinstance(dm, RetrievalData) if needs_data else callable(getattr(dm, "set_image_transform", None))
    if not serves:
        raise SystemExit(f"{type(dm).__name__} does not serve galleries: use datamodules.ShardDataModule")
    if ckpt:
        load_weights_into(model, ckpt)
    model.eval()
    transform = model.image_transform()
    if transform is not None:
        dm.set_image_transform(transform)
    return model, dm, cli


def model_fingerprint(model: nn.Module, transform: Any, model_config: Any, ckpt: str | Path | None,
                      seed: Any = None) -> dict[str, str]:
    """The identity of the space a model embeds into: its class, a hash of its resolved ``model``
    config, a hash of the checkpoint file's bytes (``untrained`` and the seed without one), and the
    image preprocessing (fast or exact, the transform's settings and its pixel normalisation).
    Two runs with equal fingerprints embed a product into the same vector."""
    preprocessing, settings, normalisation = describe_transform(transform)
    return {"family": type(model).__name__,
            "model_config": _digest(json.dumps(_embedding_config(model_config), sort_keys=True,
                                               default=str).encode()),
            "checkpoint": f"sha256:{file_digest(ckpt)}" if ckpt else f"untrained (seed {seed})",
            "preprocessing": preprocessing, "image_transform": settings, "normalisation": normalisation}


def _embedding_config(model_config: Any) -> Any:
    """The ``model`` section without its ``NOT_EMBEDDING`` keys (in ``init_args`` or at the top)."""
    if not isinstance(model_config, dict):
        return model_config
    out = {k: v for k, v in model_config.items() if k not in NOT_EMBEDDING}
    if isinstance(out.get("init_args"), dict):
        out["init_args"] = {k: v for k, v in out["init_args"].items() if k not in NOT_EMBEDDING}
    return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]  # 64 bits: enough to tell models apart, short to read


def digest_cache() -> Path:
    """``$CIR_CACHE_DIR/digests.json``, by default ``$XDG_CACHE_HOME/fashion-cir/`` (``~/.cache``),
    read when needed: a later change of the environment counts."""
    own = os.environ.get("CIR_CACHE_DIR")
    if own:
        return Path(own) / "digests.json"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "fashion-cir" / "digests.json"


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # a stale mount, a folder we may not read: kept, it costs nothing
        return True


def file_digest(path: str | Path, cache: Path | None = None) -> str:
    """sha256 of a file's bytes (first 16 hex digits), read in 1 MiB blocks: a multi-GB checkpoint
    is never held in memory for this. Remembered in ``cache`` (default ``digest_cache()``) by
    resolved path, inode, size, modification and change time, so that every start of ``cir serve``
    does not read gigabytes again. The change time is the system's own (``cp -p``, ``rsync -a`` and
    ``tar`` can set the modification time, never it), so a file written or copied anew is hashed
    again. Entries of files that are gone are dropped; a cache that cannot be read or written is
    ignored."""
    cache = cache or digest_cache()
    stat = Path(path).stat()
    key = str(Path(path).resolve())
    stamp = [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    try:
        known = json.loads(cache.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            h.update(block)
    digest = h.hexdigest()[:16]
    known = {k: v for k, v in known.items() if _exists(k)}
    known[key] = {"stamp": stamp, "sha256": digest}
    try:  # two commands starting at once never leave half a file (each writes its own temporary)
        write_json_atomic(cache, known)
    except OSError:
        pass
    return digest


def fingerprint_mismatch(recorded: dict[str, str] | None, current: dict[str, str], what: str,
                         rebuild: str) -> str | None:
    """None when ``current`` (this run's model) equals the fingerprint ``recorded`` with ``what`` (an
    index), else one line naming each differing field with both values and how to ``rebuild``."""
    if recorded is None:
        return (f"{what} records no model fingerprint (it was built before fingerprints were recorded), so "
                f"nothing says which model embedded it: rebuild it with {rebuild}")
    differ = [f"{key} {recorded.get(key, 'not recorded')!r} (index) vs {current.get(key)!r} (this run)"
              for key in FINGERPRINT if recorded.get(key) != current.get(key)]
    if not differ:
        return None
    return (f"{what} was built by another model: " + "; ".join(differ) +
            f". Query it with the experiment and checkpoint it was built with, or rebuild it with {rebuild}")


def load_weights_into(model: nn.Module, ckpt: str | Path) -> None:
    """The checkpoint's weights into the model built from the experiment. A checkpoint of a LoRA run
    holds adapters beside the base weights: the model gets its adapters (the experiment's
    ``model.init_args.lora``) before loading; a merged or plain one loads as it is. A checkpoint of
    another model class is refused in one line naming both (not a screen of state-dict keys)."""
    wanted = f"{type(model).__module__}.{type(model).__qualname__}"
    prog = command_name() or "cir"
    if message := checkpoint_class_mismatch(ckpt, wanted, prog, "--ckpt"):
        raise SystemExit(message)
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


def resolve_device_or_exit(prog: str, device: str) -> torch.device:
    """``--device`` resolved before the model loads; CUDA asked for where there is none ends the
    command in one line."""
    try:
        return resolve_device(device)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: a device string torch does not know
        raise SystemExit(f"{prog}: {one_line(exc)}") from None


def gallery_total(dm: RetrievalData, split: str, kind: str = "products") -> int | None:
    """How many products (or ``triplets``) the manifest lists for ``split``: a progress bar's total."""
    manifest = getattr(dm, "manifest", None)
    return manifest.get("splits", {}).get(split, {}).get(kind) if isinstance(manifest, dict) else None


def encode_gallery(model: Retriever, dm: RetrievalData, split: str,
                   device: str | torch.device | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """Every gallery product of ``split``: embeddings, the dataset's own ids, dataset names."""
    embs, ids, datasets, _ = encode_gallery_with_meta(model, dm, split, device)
    return embs, ids, datasets


def encode_gallery_with_meta(model: Retriever, dm: RetrievalData, split: str, device: str | torch.device | None = None,
                             ) -> tuple[torch.Tensor, list[str], list[str], list[dict[str, Any]]]:
    """``encode_gallery`` plus each product's shard metadata (category, captions, attributes), which
    a result table shows beside the id. Embedded on ``device`` (default: where the model is)."""
    total = gallery_total(dm, split)
    target = resolve_device(device) if device is not None else None
    with Progress(command_name() or "cir", f"embedding the {split} gallery", total, "product") as progress:
        out = embed_products(model, dm.eval_dataloaders(split)[0], target, progress=progress)
    return out.embeddings, out.raw_ids, out.datasets, out.metas


def query_batch(dm: RetrievalData, images: list[str], text: str) -> dict[str, Any]:
    """A one-query triplet batch from image files (upright, as their EXIF orientation says),
    preprocessed as the model's data is. A file that is not a readable image ends the command in
    one line (the commands check ``--images`` before the model loads; this is for library callers
    and any command that does not)."""
    try:
        views = [dm.image_transform(open_upright(p)) for p in images]
    except (OSError, UnidentifiedImageError) as exc:  # UnidentifiedImageError is an OSError; named for the reader
        if debug_requested():
            raise
        raise SystemExit(f"{command_name() or 'cir'}: --images: {one_line(exc)}") from None
    # Tensor views stack into [1, V, 3, H, W]; Qwen's variable-size patch grids stay a list.
    return {"source_images": torch.stack(views)[None] if isinstance(views[0], torch.Tensor) else [views],
            "source_mask": torch.ones(1, len(images), dtype=torch.bool), "text": [text]}


def encode_query(model: Retriever, dm: RetrievalData, images: list[str], text: str) -> torch.Tensor:
    """One query from image files and a text, embedded as every query batch is."""
    return next(embed_queries(model, [query_batch(dm, images, text)]))[0]
