"""FashionGen's h5 file → FashionMV's image layout (``ROOT/images/{dataset}/{product_id}/NN.jpg``).

FashionGen ships its images inside an HDF5 file, one row per image, several rows per product
(``input_productID``, ``input_image`` as ``N×H×W×3`` uint8). Needs ``h5py`` (the ``fashiongen`` extra).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image


def _decode_id(raw: object) -> str:
    """FashionGen stores ids as integers or byte strings, sometimes wrapped in 1-element arrays."""
    if isinstance(raw, np.ndarray):
        raw = raw.reshape(-1)[0]
    if isinstance(raw, bytes | np.bytes_):
        return raw.decode().strip()
    if isinstance(raw, np.integer | int):
        return str(int(raw))
    return str(raw).strip()


def extract_fashiongen_h5(h5_path: str | Path, root: str | Path, dataset: str = "fashiongen_val",
                          max_views: int = 5) -> dict[str, int]:
    """Write each product's images (at most ``max_views``) as JPEGs; returns counts."""
    try:
        import h5py
    except ImportError as exc:  # an optional extra: say how to get it
        raise ImportError("cir data fashiongen-h5 needs h5py: pip install 'fashion-cir[fashiongen]'") from exc
    out = Path(root) / "images" / dataset
    written: dict[str, int] = defaultdict(int)
    skipped = 0
    with h5py.File(h5_path, "r") as f:
        for key in ("input_productID", "input_image"):
            if key not in f:
                raise KeyError(f"{h5_path}: no dataset {key!r}; found {sorted(f.keys())}")
        ids, images = f["input_productID"], f["input_image"]
        for i in range(len(ids)):
            pid = _decode_id(ids[i])
            if written[pid] >= max_views:
                skipped += 1
                continue
            folder = out / pid
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(images[i], dtype=np.uint8)).save(folder / f"{written[pid]:02d}.jpg", quality=95)
            written[pid] += 1
    return {"products": len(written), "images": sum(written.values()), "images_over_max_views": skipped}
