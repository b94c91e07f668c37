"""What a DataModule's image transform does to a view, and which model settings shape an embedding,
as comparable strings.

A saved index, an embedding export and a running model each describe their preprocessing this way,
so that vectors made with other pixels (another resize, padding or normalisation) are refused
instead of searched together.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Image processor settings that make up the pixel normalisation (recorded apart from the geometry).
_NORMALISATION_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


# Settings of the model section that change how training runs or how Recall@K is computed, never the
# vector a product is embedded into: an index stays valid when only these differ.
NOT_EMBEDDING = frozenset({"evaluation", "optimizer", "scheduler", "loss", "stage2_loss", "mined_negatives",
                           "skip_bad_steps", "grad_cache_chunk", "init_checkpoint", "training_stage"})


def hparams_digest(hparams: Any) -> str:
    """A digest of a module's saved hyperparameters without the ``NOT_EMBEDDING`` ones: two modules
    built from the same model section (a CLI run saves it in config form) give the same digest."""
    own = {k: v for k, v in dict(hparams or {}).items() if k not in NOT_EMBEDDING and not k.startswith("_")}
    return _digest(json.dumps(own, sort_keys=True, default=str).encode())


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def describe_transform(transform: Any) -> tuple[str, str, str]:
    """(``fast``/``exact``, the transform chain with a hash of its settings, the pixel normalisation)
    of a DataModule's image transform; ``n/a`` where a transform does not say. Wrappers such as
    ``TargetPad`` hold the backbone's transform in ``.transform``: the chain is followed through them."""
    mode, normalisation, names, settings = "n/a", "n/a", [], {}
    seen: set[int] = set()
    while transform is not None and id(transform) not in seen:
        seen.add(id(transform))
        name = type(transform).__name__
        names.append(name)
        own = vars(transform) if hasattr(transform, "__dict__") else {}
        settings[name] = {k: v for k, v in own.items() if isinstance(v, int | float | str | bool | list | tuple)}
        mode = str(own.get("preprocessing", mode))
        processor = own.get("processor")
        if processor is not None and hasattr(processor, "to_dict"):
            options = processor.to_dict()
            normalisation = _normalisation(options)
            settings["processor"] = {k: v for k, v in options.items() if k not in _NORMALISATION_KEYS}
        transform = own.get("transform")
    digest = _digest(json.dumps(settings, sort_keys=True, default=str).encode())
    return mode, f"{'>'.join(names) or 'none'} {digest}", normalisation


def _normalisation(options: dict[str, Any]) -> str:
    parts = []
    if options.get("do_rescale"):
        parts.append(f"rescale {float(options.get('rescale_factor', 1.0)):.6g}")
    if options.get("do_normalize"):
        for key in ("image_mean", "image_std"):
            value = options.get(key)
            values = value if isinstance(value, list | tuple) else [value]
            parts.append(f"{key.removeprefix('image_')} " + ",".join(f"{float(v):.4g}" for v in values))
    return "; ".join(parts) or "none"
