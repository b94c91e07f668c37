"""DDP on CPU processes (gloo): the global-batch equivalence, uneven shards, one MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.gloo import run_gloo
from support.ports import free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_modules import CLIP4CIR, Products, SumFusion, SymmetricInfoNCE
from lightning_modules.backbones import CLIPBackbone

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"


class _Step(nn.Module):
    """One training step's loss as a module, so DDP can wrap it."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = CLIP4CIR(CLIPBackbone("tiny"), SumFusion(), loss=SymmetricInfoNCE(temperature=0.1))
        self.model.loss.set_distributed(rank, world)

    def forward(self, batch: dict) -> torch.Tensor:
        q = self.model.encode_query(batch)
        t = self.model.encode_target(Products.targets_of(batch))
        return self.model.loss(q, t, gather=True)


def _batch(lo: int, hi: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    n = 8
    images = torch.randn(n, 2, 3, 64, 64, generator=gen)
    targets = torch.randn(n, 1, 3, 64, 64, generator=gen)
    words = ["make it red", "add an open back", "long sleeves please", "switch to stripes",
             "remove the pocket", "make it blue", "a side slit", "short hem"]
    return {"source_images": images[lo:hi], "source_mask": torch.ones(hi - lo, 2, dtype=torch.bool),
            "target_images": targets[lo:hi], "target_mask": torch.ones(hi - lo, 1, dtype=torch.bool),
            "text": words[lo:hi]}


def _ddp_grads(rank: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    step = _Step(rank, world)
    ddp = DistributedDataParallel(step)
    b = 8 // world
    loss = ddp(_batch(rank * b, (rank + 1) * b))
    loss.backward()
    return float(loss), {k: p.grad.clone() for k, p in step.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_two_ranks_of_b_equal_one_process_of_2b() -> None:
    single = _Step(0, 1)
    loss = single(_batch(0, 8))
    loss.backward()
    reference = {k: p.grad for k, p in single.named_parameters() if p.grad is not None}
    results = run_gloo(_ddp_grads, 2)
    # The mean of the per-rank losses is the global-batch loss; DDP's averaged gradients equal it.
    assert sum(r[0] for r in results) / 2 == pytest.approx(float(loss), rel=1e-5)
    for grads in (results[0][1], results[1][1]):
        assert grads.keys() == reference.keys()
        for k, g in reference.items():
            assert torch.allclose(grads[k], g, atol=1e-6, rtol=1e-4), k


@pytest.mark.slow
def test_ddp_cli_uneven_shards_no_hang_same_recall_one_mlflow_run(small_data: Path, tmp_path: Path) -> None:
    import mlflow

    manifest = json.loads((small_data / "manifest.json").read_text())
    # Shards that do not divide over 2 ranks: an odd count somewhere, one-shard splits in val.
    assert len(manifest["splits"]["train"]["shards"]["triplets"]) % 2 == 1 or any(
        len(v) == 1 for v in manifest["splits"]["val"]["shards"].values())
    lightning = str(Path(sys.executable).parent / "lightning")
    data = [f"--data.init_args.data_dir={small_data}", "--data.init_args.products=120",
            "--data.init_args.generator_seed=3", "--data.init_args.val_fraction=0.25",
            "--data.init_args.num_workers=1", "--data.init_args.batch_size=4"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def run(subcommand: str, *args: str) -> str:
        # The config first: later arguments override earlier ones.
        # Its own rendezvous port per run: Lightning's own pick (an ephemeral port) raced the other xdist worker.
        out = subprocess.run([lightning, subcommand, "--config", str(DEMO), *data, *args],
                             env={**env, "MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    run("fit", *ddp, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path / 'ddp'}")
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("fashion-cir").experiment_id])
    assert len(runs) == 1  # only rank 0 logs
    evals = list((tmp_path / "ddp" / "eval").rglob("eval_results.json"))
    assert len(evals) == 1

    def recall(*extra: str) -> dict:
        root = tmp_path / f"val{len(extra)}"
        run("validate", *extra, f"--ckpt_path={ckpt}", "--trainer.logger=false", f"--trainer.default_root_dir={root}")
        results = json.loads(next(root.rglob("eval_results.json")).read_text())
        return {"overall": results["overall"], "datasets": results["datasets"]}

    single, distributed = recall(), recall(*ddp)
    for k, v in single["overall"].items():
        if k.startswith(("recall", "mean", "score")):
            assert distributed["overall"][k] == pytest.approx(v, abs=1e-6), k
    for ds, values in single["datasets"].items():
        assert distributed["datasets"][ds]["gallery_size"] == values["gallery_size"]
        assert distributed["datasets"][ds]["queries"] == values["queries"]
