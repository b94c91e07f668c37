"""The generated products as a retailer's catalogue, the input of ``cir build``.

``root/images/<category>/<id>/NN_<view>.jpg`` and ``root/products.jsonl`` are what a retailer has
(accessories carry no split, so ``cir build`` splits those itself);
``root/ground_truth.jsonl`` is kept apart for the oracle backend only: each product's attributes,
whether it is clothing, and whether the oracle's captions for it carry a deliberate left/right
mistake (which the oracle's verifier then catches). A few accessories (bags, drawn plainly) join
the clothes so the non-clothing filter has something to drop.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .attributes import COLOURS
from .generate import SyntheticData

ACCESSORY_VIEWS = ("front", "back", "side_left")


def _has_sided_detail(attrs: dict[str, str], views: list[str]) -> bool:
    detail = attrs.get("front_detail", "none")
    return detail.split(" ")[0] in ("left", "right") and bool({"front", "back"} & set(views))


def _bag(colour: str, view: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(rng.randint(200, 250) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    half = 0.18 if view.startswith("side") else 0.32
    x0, x1 = size * (0.5 - half), size * (0.5 + half)
    draw.rectangle((x0, size * 0.4, x1, size * 0.85), fill=COLOURS[colour])
    draw.arc((size * 0.35, size * 0.15, size * 0.65, size * 0.6), 180, 360, fill=(30, 30, 35), width=max(2, size // 24))
    return img


def write_catalogue_layout(root: str | Path, data: SyntheticData, seed: int = 0,
                           lr_error_rate: float = 0.3, accessories: int | None = None) -> dict[str, Any]:
    root = Path(root)
    rng = random.Random(seed)
    rows, truth = [], []
    for pid, spec in sorted(data.products.items()):
        product = spec.render(data.styles[spec.dataset].size)
        raw_id = f"{spec.attributes['category']}/{pid}"
        folder = root / "images" / raw_id
        folder.mkdir(parents=True, exist_ok=True)
        for i, (img, view) in enumerate(zip(product.views, product.view_names, strict=True)):
            img.save(folder / f"{i:02d}_{view}.jpg", quality=92)
        # The generator's split goes in as a native split (as FashionGen's): product families stay
        # inside one split, so both splits get triplets.
        rows.append({"product_id": raw_id, "dataset": spec.dataset, "category": spec.attributes["category"],
                     "title": f"{spec.attributes['colour']} {spec.attributes['category']}",
                     "split": data.split_of[pid]})
        lr_error = _has_sided_detail(spec.attributes, product.view_names) and rng.random() < lr_error_rate
        truth.append({"product_id": raw_id, "dataset": spec.dataset, "clothing": True, "attributes": spec.attributes,
                      "view_names": product.view_names, "lr_error": lr_error})
    n_acc = max(2, len(data.products) // 25) if accessories is None else accessories
    datasets = sorted(data.styles)
    for i in range(n_acc):
        dataset = datasets[i % len(datasets)]
        raw_id = f"bag/a{i:05d}"
        colour = rng.choice(sorted(COLOURS))
        folder = root / "images" / raw_id
        folder.mkdir(parents=True, exist_ok=True)
        for j, view in enumerate(ACCESSORY_VIEWS):
            _bag(colour, view, data.styles[dataset].size, rng).save(folder / f"{j:02d}_{view}.jpg", quality=92)
        rows.append({"product_id": raw_id, "dataset": dataset, "category": "bag", "title": f"{colour} bag"})
        truth.append({"product_id": raw_id, "dataset": dataset, "clothing": False,
                      "attributes": {"category": "bag", "colour": colour}, "view_names": list(ACCESSORY_VIEWS),
                      "lr_error": False})
    (root / "products.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ground_truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth))
    return {"products": len(rows), "clothing": len(data.products), "accessories": n_acc,
            "lr_errors": sum(t["lr_error"] for t in truth), "ground_truth": str(root / "ground_truth.jsonl")}
