"""Hostile and broken inputs: each is skipped and counted, or refused with an error that names the
file or key and the fix; none costs a run its checkpoint or its MLflow record."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.shard_tools import rewrite_shard

from cir.lightning_cli import build_cli
from datamodules import ShardDataModule
from datamodules.batching import GalleryExample, ResizeToTensor, TripletExample, collate
from datamodules.shards import read_manifest, shard_urls
from lightning_modules import CLIP4CIR, SumFusion
from lightning_modules.backbones import CLIPBackbone
from lightning_modules.core import load_init_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_truncated_shard_is_read_up_to_the_damage_and_counted(small_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    shutil.copytree(small_data, data)
    shard = Path(shard_urls(data, read_manifest(data), "val", "gallery")[0])
    full = shard.read_bytes()
    shard.write_bytes(full[: len(full) // 2])
    dm = ShardDataModule(str(data), num_workers=0, eval_batch_size=8)
    gallery, _ = dm.val_dataloader()
    n = sum(len(dm.on_before_batch_transfer(b, 0)["product_id"]) for b in gallery)
    assert 0 < n < read_manifest(data)["splits"]["val"]["products"]
    assert dm.skipped_total >= 1


def test_zero_and_nine_views() -> None:
    example = GalleryExample(ResizeToTensor(16))
    meta = {"product_id": "p", "dataset": "d"}
    nine = {"__key__": "k", "json": meta, **{f"view{i}.jpg": Image.new("RGB", (8, 8)) for i in range(9)}}
    assert example(nine)["images"].shape[0] == 5  # at most 5 views reach the model
    with pytest.raises(ValueError, match="no 'view0.jpg' member"):
        example({"__key__": "k", "json": meta})


def test_empty_and_huge_modification_texts_encode() -> None:
    model = CLIP4CIR(CLIPBackbone("tiny"), SumFusion()).eval()
    example = TripletExample(ResizeToTensor(64), "short", with_target=False)
    samples = []
    for text in ("", " ".join(["red"] * 10_000)):
        meta = {"triplet": {"source_id": "a", "target_id": "b", "dataset": "d", "modification_short": text},
                "source": {"product_id": "a", "dataset": "d"}, "target": {"product_id": "b", "dataset": "d"}}
        samples.append(example({"__key__": "k", "json": meta, "src0.jpg": Image.new("RGB", (8, 8))}))
    with torch.no_grad():
        q = model.encode_query(collate(samples))
    assert q.shape == (2, 48) and torch.isfinite(q).all()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_checkpoint_with_a_pickle_payload_is_refused(tmp_path: Path, small_data: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    model = CLIP4CIR(CLIPBackbone("tiny"), SumFusion())
    torch.save({"state_dict": model.state_dict(), "extra": _Payload(str(marker))}, evil)
    victim = CLIP4CIR(CLIPBackbone("tiny"), SumFusion())
    with pytest.raises(ValueError, match="refused.*weights-only"):
        load_init_checkpoint(victim, evil, "the stage-1 run", "model.init_args.init_checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("arg,key", [("--model.init_args.no_such_key=1", "no_such_key"),
                                     ("--data.init_args.batch_size=many", "batch_size")])
def test_bad_config_values_name_the_key(arg: str, key: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_cli(["--config", str(DEMO), arg], run=False)
    assert key in capsys.readouterr().err


@pytest.mark.slow
def test_corrupt_training_samples_cost_no_checkpoint_and_no_mlflow_record(small_data: Path, tmp_path: Path) -> None:
    import mlflow

    data = tmp_path / "d"
    shutil.copytree(small_data, data)
    manifest = read_manifest(data)
    shard = Path(shard_urls(data, manifest, "train", "triplets")[0])
    # One training sample's first source view cut short: skipped and counted (148 samples, a budget of
    # 1% of them); more than the budget stops the run (tests/unit/datamodules/test_skip_policy.py).
    with tarfile.open(shard) as tar:
        victim = next(m.name for m in tar.getmembers() if m.name.endswith("src0.jpg"))
    rewrite_shard(shard, lambda name, b: b[:40] if name == victim else b)
    cli = build_cli(["fit", "--config", str(DEMO), f"--data.init_args.data_dir={data}",
                     "--data.init_args.products=120", "--data.init_args.generator_seed=3",
                     "--data.init_args.val_fraction=0.25", "--data.init_args.num_workers=0",
                     "--data.init_args.batch_size=4", "--trainer.max_epochs=1",
                     f"--trainer.default_root_dir={tmp_path}"])
    assert Path(cli.trainer.checkpoint_callback.last_model_path).is_file()
    logger = cli.trainer.logger
    run = mlflow.MlflowClient(logger._tracking_uri).get_run(logger.run_id)
    assert run.data.metrics["data/skipped_samples"] > 0 and "val/recall_at_10" in run.data.metrics
    assert json.loads((data / "manifest.json").read_text()) == manifest
