"""Exact resume: a run killed at any point and resumed with ``--ckpt_path last`` ends with the same
weights (max abs difference 0 on the CPU) and logs the same metrics as a run never killed.

Each setup trains three times from the same seed: uninterrupted; killed (SIGKILL of the whole
process group, DataLoader workers and DDP ranks included) at a random step inside an epoch or
inside a validation; and resumed from the last step checkpoint. Every metric value the killed and
resumed runs logged (steps replayed after the kill are logged twice) must equal the reference's at
that step.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
LIGHTNING = str(Path(sys.executable).parent / "lightning")
DEMOS = ROOT / "experiments" / "demos"


def two_stage_config(tmp_path: Path) -> Path:
    """The two-stage CLIP4CIR demo with its switch moved to epoch 1, inside the run."""
    path = tmp_path / "two_stage.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": [str(ROOT / "configs/trainer/cpu.yaml"), str(ROOT / "configs/callbacks/retrieval.yaml"),
                     str(ROOT / "configs/logger/mlflow.yaml"), str(ROOT / "configs/data/synthetic.yaml"),
                     str(ROOT / "configs/model/clip4cir/tiny.yaml"), str(ROOT / "configs/eval/generated.yaml")],
        "seed_everything": 0,
        "model": {"init_args": {"stage2_loss": {"class_path": "lightning_modules.StaticBankLoss"}}},
        "trainer": {"callbacks+": [{"class_path": "callbacks.StageSwitch", "init_args": {"switch_epoch": 1}}]}}))
    return path


SETUPS = {
    "clip4cir": (DEMOS / "clip4cir.yaml", [], 1),
    "clip4cir_two_stage": (None, [], 1),
    "llava_caption": (DEMOS / "llava_caption.yaml", [], 1),
    "procir_mt_align_cot": (DEMOS / "procir.yaml", [
        "--model.init_args.cot=true", "--model.init_args.backbone.init_args.min_pixels=1024",
        "--model.init_args.backbone.init_args.max_pixels=4096",
        '--trainer.callbacks+={"class_path": "callbacks.CoTSchedule"}'], 1),
    "clip4cir_ddp": (DEMOS / "clip4cir.yaml", ["--trainer.strategy=ddp", "--trainer.devices=2"], 2),
}



def _run(args: list[str], env: dict[str, str], expect_killed: bool = False) -> None:
    # Its own rendezvous port: DDP runs of the other test worker must not race for Lightning's pick.
    env = {**env, "MASTER_PORT": str(free_port())}
    proc = subprocess.run([LIGHTNING, "fit", *args], env=env, capture_output=True, text=True, timeout=900,
                          start_new_session=True)
    if expect_killed:
        assert proc.returncode == -9, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def _history(tracking: str, root: Path) -> dict[str, dict[int, set[float]]]:
    import mlflow

    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    client = mlflow.MlflowClient(tracking)
    out: dict[str, dict[int, set[float]]] = {}
    run = client.get_run(ckpt["mlflow_run_id"])
    for key in run.data.metrics:
        # The epoch's padding share covers the batches this process saw (docs/operations.md, exact-resume limits).
        if key.startswith(("wall", "time")) or key == "data/padding_fraction":
            continue
        for m in client.get_metric_history(run.info.run_id, key):
            out.setdefault(key, {}).setdefault(m.step, set()).add(m.value)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(setup: str, small_data: Path, tmp_path: Path) -> None:
    experiment, extra, world = SETUPS[setup]
    experiment = experiment or two_stage_config(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    every3 = tmp_path / "every3.yaml"
    common = ["--config", str(experiment), f"--data.init_args.data_dir={small_data}", "--data.init_args.products=120",
              "--data.init_args.generator_seed=3", "--data.init_args.val_fraction=0.25",
              "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=16", "--data.init_args.num_workers=2",
              # 12 of the epoch's 36 batches (18 per DDP rank): the stream is cut short every epoch, and the
              # kill still lands past a validation and a step checkpoint.
              "--trainer.max_epochs=2", "--trainer.limit_train_batches=12", "--trainer.log_every_n_steps=1",
              "--seed_everything=0", *extra]
    _run([*common, f"--trainer.default_root_dir={tmp_path / 'ref'}"], env)
    ref = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps = ref["global_step"]

    crash = tmp_path / "crash"
    every3.write_text(yaml.safe_dump({"trainer": {"callbacks+": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": f"{crash}/checkpoints", "filename": "step{step:06d}", "every_n_train_steps": 3,
                      "save_top_k": -1, "save_last": True, "enable_version_counter": False,
                      "auto_insert_metric_name": False}}]}}))
    rng = random.Random(setup)
    kill = ({"validation_epoch": 0} if setup == "clip4cir" else
            {"step": rng.randrange(steps // 2 + 1, steps - 1)})  # inside epoch 1: past a validation and a save
    killer = "--trainer.callbacks+=" + json.dumps({"class_path": "support.kill.KillAt", "init_args": kill})
    args = [*common, "--config", str(every3), f"--trainer.default_root_dir={crash}"]
    _run([*args, killer], env, expect_killed=True)
    _run([*args, "--ckpt_path=last"], env)

    got = torch.load(crash / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert got["global_step"] == steps
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), f"{setup}: {key} differs after the resume"
    import mlflow

    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("fashion-cir").experiment_id])
    assert len(runs) == 2  # the reference, and ONE run for the killed run and its resume
    expected, seen = _history(tracking, tmp_path / "ref"), _history(tracking, crash)
    assert expected.keys() == seen.keys()
    for key, by_step in expected.items():
        for step, values in seen[key].items():
            assert values == by_step[step], (setup, key, step, values, by_step[step])
