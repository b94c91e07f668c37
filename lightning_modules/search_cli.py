"""``cir-search``: build a saved faiss index of a gallery with a trained model, and query it.

    cir-search build --config experiments/demo.yaml --ckpt outputs/.../last.ckpt --out index/ [--kind ivf]
    cir-search query --index index/ --config experiments/demo.yaml --ckpt outputs/.../last.ckpt \\
        --images front.jpg back.jpg --text "make it red with an open back" [--dataset synth_studio] [-k 10]

Options after ``--`` are passed to the config (e.g. ``-- --data.init_args.data_dir=data/fashionmv``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .gallery_index import GalleryIndex


def load_model_and_data(configs: list[str], ckpt: str | None, extra: list[str]) -> tuple[Any, Any]:
    from .cli import build_cli

    args = [a for c in configs for a in ("--config", c)] + ["--trainer.logger=false", *extra]
    cli = build_cli(args, run=False)
    model, dm = cli.model, cli.datamodule
    if ckpt:
        from .retrieval import load_weights

        model.load_state_dict(load_weights(ckpt)["state_dict"])
    model.eval()
    transform = model.image_transform()
    if transform is not None:
        dm.set_image_transform(transform)
    return model, dm


@torch.no_grad()
def encode_gallery(model: Any, dm: Any, split: str) -> tuple[torch.Tensor, list[str], list[str]]:
    embs, ids, datasets = [], [], []
    gallery_loader = dm.eval_dataloaders(split)[0]
    for batch in gallery_loader:
        embs.append(model.embed_targets(batch, gallery=True).float())
        ids += [m.get("raw_id") or m["product_id"] for m in batch["meta"]]
        datasets += batch["dataset"]
    return torch.cat(embs), ids, datasets


@torch.no_grad()
def encode_query(model: Any, dm: Any, images: list[str], text: str) -> torch.Tensor:
    views = [dm.image_transform(Image.open(p).convert("RGB")) for p in images]
    # Tensor views stack into [1, V, 3, H, W]; Qwen's variable-size patch grids stay a list.
    batch = {"source_images": torch.stack(views)[None] if isinstance(views[0], torch.Tensor) else [views],
             "source_mask": torch.ones(1, len(images), dtype=torch.bool), "text": [text]}
    return model.encode_query(batch).float()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(prog="cir-search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "query"):
        p = sub.add_parser(name)
        p.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable)")
        p.add_argument("--ckpt", default=None, help="checkpoint of the trained model")
    b = sub.choices["build"]
    b.add_argument("--out", required=True)
    b.add_argument("--split", default="val")
    b.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat")
    q = sub.choices["query"]
    q.add_argument("--index", required=True)
    q.add_argument("--images", nargs="+", required=True, help="views of the source product")
    q.add_argument("--text", required=True)
    q.add_argument("--dataset", default=None)
    q.add_argument("-k", type=int, default=10)
    args = parser.parse_args(argv)
    # The model config is parsed by LightningCLI: it warns when sys.argv also holds our own arguments.
    sys.argv = sys.argv[:1]

    model, dm = load_model_and_data(args.config, args.ckpt, extra)
    if args.command == "build":
        emb, ids, datasets = encode_gallery(model, dm, args.split)
        GalleryIndex.build(emb, ids, datasets, kind=args.kind).save(args.out)
        print(f"indexed {len(ids)} products of {sorted(set(datasets))} ({args.kind}) in {Path(args.out)}")
        return
    index = GalleryIndex.load(args.index)
    results = index.search(encode_query(model, dm, args.images, args.text), args.k, dataset=args.dataset)[0]
    print(f"{'rank':>4}  {'score':>7}  product")
    for rank, (pid, score) in enumerate(results, 1):
        print(f"{rank:>4}  {score:>7.4f}  {pid}")


if __name__ == "__main__":
    main()
