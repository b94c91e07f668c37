"""After an evaluation: ``eval_results.json`` and a retrieval picture, written and logged to MLflow.

``eval_results.json`` holds, per dataset/category, the recalls, gallery size and query count, plus
the overall and averaged numbers, skipped samples, the checkpoint and a hash of the config, so a
number in a table can be traced to what produced it. The picture shows a few fixed queries (the
first of the split, in shard order): source views, modification text, and the top-10 products,
the target framed in green.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger
from PIL import Image, ImageDraw, ImageFont

from datamodules.batching import TripletExample, collate, views_of
from datamodules.interfaces import RetrievalData
from datamodules.schema import stable_id
from lightning_modules.core.checkpoints import checkpoint_metadata
from lightning_modules.core.embedding import embed_query_batch
from lightning_modules.core.interfaces import Retriever
from lightning_modules.retrieval import similarities
from lightning_modules.retrieval.metric_names import DATASET_PATTERN, REFERENCE_PATTERN

# ``val/<dataset>/recall_at_5``, ``val/<dataset>/text_blind/recall_at_5``: a reference line's prefix
# is never read as a dataset name.
_PER_DATASET = re.compile(rf"^(?P<stage>val|test)/(?P<ds>{DATASET_PATTERN})/"
                          rf"(?P<name>(?:(?:{REFERENCE_PATTERN})/)?\w+)$")
_OVERALL = re.compile(rf"^(?P<stage>val|test)/(?P<name>(?:(?:{REFERENCE_PATTERN})/)*"
                      r"(?:(?:mean_)?recall(?:_subset)?_at_\d+|score|queries)|loss)$")


def config_hash(pl_module: LightningModule, trainer: Trainer) -> str:
    dm = trainer.datamodule
    payload = {"model": dict(pl_module.hparams), "data": dict(dm.hparams) if dm is not None else {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trained_position(trainer: Trainer) -> tuple[int, int]:
    """(epoch, global step) of the weights evaluated: the checkpoint's outside fit, where the Trainer's
    own counters start at 0 whatever the checkpoint."""
    path = trainer.ckpt_path
    if trainer.state.fn != "fit" and path and Path(path).is_file():
        try:
            checkpoint = checkpoint_metadata(path)
            return int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))
        except Exception:  # noqa: BLE001 - the results matter more than where they came from
            pass
    return trainer.current_epoch, trainer.global_step


def collect_results(trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, Any]:
    per_dataset: dict[str, dict[str, float]] = {}
    overall: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        if m := _PER_DATASET.match(key):
            if m["stage"] == stage:
                per_dataset.setdefault(m["ds"], {})[m["name"]] = float(value)
        elif (m := _OVERALL.match(key)) and m["stage"] == stage:
            overall[m["name"]] = float(value)
    dm = trainer.datamodule
    data = dm if isinstance(dm, RetrievalData) else None
    epoch, step = trained_position(trainer)
    ckpt = trainer.ckpt_path or (trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else "")
    return {
        "stage": stage,
        "split": data.split_of(trainer.state.fn.value) if data else None,
        "data_dir": str(data.data_dir) if data else "",
        "epoch": epoch,
        "global_step": step,
        "checkpoint": ckpt or None,
        "config_hash": config_hash(pl_module, trainer),
        "protocol": pl_module.evaluation.protocol() if isinstance(pl_module, Retriever) else {},
        "skipped_samples": data.skipped_total if data else None,
        "overall": overall,
        "datasets": per_dataset,
    }


def _thumb(img: Image.Image, size: int, border: tuple[int, int, int] | None = None) -> Image.Image:
    t = img.convert("RGB").resize((size, size))
    if border:
        ImageDraw.Draw(t).rectangle([0, 0, size - 1, size - 1], outline=border, width=max(2, size // 16))
    return t


def retrieval_picture(rows: list[dict[str, Any]], thumb: int = 96, font_size: int = 20) -> Image.Image:
    """``rows``: dicts with ``source`` (PIL views), ``text``, ``results`` ([(PIL, is_target)]). The
    modification text is set large enough to read at the size MLflow's artifact viewer shows it."""
    font = ImageFont.load_default(size=font_size)
    n_src = max(len(r["source"]) for r in rows)
    n_res = max(len(r["results"]) for r in rows)
    width = (n_src + n_res) * (thumb + 4) + 24
    chars = max(20, int(width / (0.55 * font_size)))
    wrapped = [textwrap.wrap(r["text"], width=chars)[:3] for r in rows]
    line_h = font_size + 6
    heights = [thumb + 8 + line_h * max(1, len(w)) + 8 for w in wrapped]
    canvas = Image.new("RGB", (width, sum(heights) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 8
    for row, lines, h in zip(rows, wrapped, heights, strict=True):
        for j, view in enumerate(row["source"]):
            canvas.paste(_thumb(view, thumb, (40, 40, 200)), (4 + j * (thumb + 4), y))
        x0 = 4 + n_src * (thumb + 4) + 16
        for j, (img, hit) in enumerate(row["results"]):
            canvas.paste(_thumb(img, thumb, (20, 170, 40) if hit else None), (x0 + j * (thumb + 4), y))
        for k, line in enumerate(lines):
            draw.text((4, y + thumb + 6 + k * line_h), line, fill=(0, 0, 0), font=font)
        y += h
    return canvas


def recall_curves_picture(curves: dict[str, dict[str, Any]], max_k: int, path: Path) -> None:
    """Recall@K for K = 1..``max_k`` per dataset from 0-based target ranks: the model, its text-blind
    line and chance (K / gallery), one panel per dataset, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    names = sorted(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    ks = torch.arange(1, max_k + 1)
    for ax, name in zip(axes[0], names, strict=True):
        entry = curves[name]
        for key, label, style in (("model", "model", "-"), ("text_blind", "text-blind (source only)", "--")):
            ranks = entry[key].cpu()
            if len(ranks):
                ax.plot(ks, [(ranks < k).float().mean().item() for k in ks], style, label=label)
        size = max(1, int(entry["gallery_size"]))
        ax.plot(ks, [min(1.0, k / size) for k in ks.tolist()], ":", color="grey", label=f"chance (gallery {size})")
        ax.set(title=name, xlabel="K", ylabel="Recall@K", ylim=(0, 1.02), xlim=(1, max_k))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


class EvalArtifacts(Callback):
    """Writes ``eval_results.json`` (and a retrieval PNG) after validate/test and at the end of fit.

    Args:
        out_dir: where files go; default ``{trainer.default_root_dir}/eval/{run id or stage}``.
        examples: queries drawn in the picture (0: no picture).
        top_k: results drawn per query.
    """

    def __init__(self, out_dir: str | None = None, examples: int = 4, top_k: int = 10) -> None:
        self.out_dir = out_dir
        self.examples = examples
        self.top_k = top_k

    def _folder(self, trainer: Trainer, stage: str) -> Path:
        run = next((lg.run_id for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        base = Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "eval"
        folder = base / (run or "local") / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _write(self, trainer: Trainer, pl_module: LightningModule, stage: str, picture: bool) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or trainer.fast_dev_run:
            return
        results = collect_results(trainer, pl_module, stage)
        if not results["overall"]:
            return
        folder = self._folder(trainer, stage)
        files = [folder / "eval_results.json"]
        tmp = files[0].with_suffix(".tmp")  # a killed job leaves the previous results whole
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(files[0])
        curves = getattr(pl_module, "last_ranks", None)
        if curves and isinstance(pl_module, Retriever):
            files.append(folder / "recall_curves.png")
            recall_curves_picture(curves, max(pl_module.evaluation.top_k), files[-1])
        if picture and self.examples > 0:
            img = self.picture(trainer, pl_module, results["split"])
            if img is not None:
                files.append(folder / "retrieval_examples.png")
                img.save(files[-1])
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                for f in files:
                    logger.experiment.log_artifact(logger.run_id, str(f), artifact_path=None if stage == "val"
                                                   else stage)

    @torch.no_grad()
    def picture(self, trainer: Trainer, pl_module: LightningModule, split: str | None) -> Image.Image | None:
        dm = trainer.datamodule
        if not (isinstance(dm, RetrievalData) and isinstance(pl_module, Retriever)) or split is None:
            return None
        gallery = pl_module.last_gallery
        if gallery is None:
            return None
        samples = [s for s in dm.example_queries(split, self.examples) if s["json"]["triplet"].get("target_id")]
        if not samples:
            return None
        g_emb, g_ids, g_ds = (t.to(pl_module.device) for t in gallery)
        example = TripletExample(dm.image_transform, "short", with_target=False, captions=dm.captions)
        batch = collate([example(s) for s in samples])
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
        was_training = pl_module.training
        pl_module.eval()
        queries = embed_query_batch(pl_module, batch).float()
        pl_module.train(was_training)
        names = list(pl_module.dataset_names)
        picks = []
        for q, s in zip(queries, samples, strict=True):
            ds = names.index(s["json"]["triplet"]["dataset"]) if s["json"]["triplet"]["dataset"] in names else -1
            sel = (g_ds == ds).nonzero().flatten()
            scores = similarities(q[None], g_emb[sel])[0]
            top = sel[scores.topk(min(self.top_k, len(sel))).indices]
            picks.append([int(i) for i in g_ids[top]])
        products = dm.gallery_products(split, {i for p in picks for i in p})
        rows = []
        for s, pick in zip(samples, picks, strict=True):
            target = stable_id(s["json"]["triplet"]["target_id"])
            results = [(products[i]["view0.jpg"], i == target) for i in pick if i in products]
            source = views_of(s, "src")
            rows.append({"source": source, "text": s["json"]["triplet"]["modification_short"], "results": results})
        return retrieval_picture(rows)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fitting = trainer.state.fn.value == "fit"
        self._write(trainer, pl_module, "val", picture=not fitting)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "val", picture=True)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "test", picture=True)
