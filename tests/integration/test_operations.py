"""Experiment operations: non-finite losses, Optuna sweeps that survive a kill, cir compare (the
exact resume of a killed run is ``test_exact_resume.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import ShardDataModule
from lightning_modules import CLIP4CIR, SumFusion, SymmetricInfoNCE
from lightning_modules.backbones import CLIPBackbone

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"


class _NaNAfter(SymmetricInfoNCE):
    """In-batch InfoNCE that turns NaN from the ``n``-th call on (a diverging run)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, query, target, gather=True):
        self.calls += 1
        loss = super().forward(query, target, gather)
        return loss * float("nan") if self.calls > self.n else loss


def _fit(module, data: Path, tmp_path: Path, steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ShardDataModule(str(data), batch_size=8, num_workers=0))
    return trainer


def test_non_finite_loss_stops_with_the_step_and_terms(small_data: Path, tmp_path: Path) -> None:
    module = CLIP4CIR(CLIPBackbone("tiny"), SumFusion(), loss=_NaNAfter(2))
    with pytest.raises(FloatingPointError, match=r"global step 2 .*'loss': nan.*skip_bad_steps"):
        _fit(module, small_data, tmp_path)


def test_skip_bad_steps_skips_and_counts_without_touching_weights(small_data: Path, tmp_path: Path) -> None:
    module = CLIP4CIR(CLIPBackbone("tiny"), SumFusion(), loss=_NaNAfter(2), skip_bad_steps=True)
    before = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[Snap()],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ShardDataModule(str(small_data), batch_size=8, num_workers=0))
    assert module.skipped_steps == 3
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.slow
def test_sweep_killed_and_resumed_keeps_every_trial_then_compare(small_data: Path, tmp_path: Path, capsys) -> None:
    import mlflow
    import optuna
    import yaml

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "experiment": str(DEMO), "study_name": "t", "metric": "val/recall_at_10",
        "n_trials": 3, "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "output_dir": str(tmp_path / "sweeps"),
        "sampler": {"name": "RandomSampler", "seed": 0}, "pruner": {"name": "NopPruner"},
        "overrides": ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3",
                      f"--data.init_args.data_dir={small_data}",
                      "--data.init_args.products=120", "--data.init_args.generator_seed=3",
                      "--data.init_args.val_fraction=0.25", "--data.init_args.num_workers=0",
                      "--data.init_args.batch_size=8"],
        "search_space": {"model.init_args.loss.init_args.temperature": {"type": "float", "low": 0.03, "high": 0.2,
                                                                        "log": True},
                         "model.init_args.optimizer.init_args.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
    }))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [str(Path(sys.executable).parent / "cir"), "sweep", "--config", str(sweep)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    deadline = time.time() + 600
    while True:  # kill it in its second trial, once that trial has written a checkpoint
        assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:] if first.stdout else ""
        try:
            trials = optuna.load_study(study_name="t", storage=storage).trials
        except KeyError:
            trials = []
        running = [t.number for t in trials if t.state.name == "RUNNING"]
        if (sum(t.state.name == "COMPLETE" for t in trials) >= 1 and len(running) == 1
                and (tmp_path / "sweeps" / "t" / f"trial-{running[0]}" / "checkpoints" / "last.ckpt").exists()):
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = optuna.load_study(study_name="t", storage=storage).trials
    interrupted = [t.number for t in before if t.state.name == "RUNNING"]
    completed = [t.number for t in before if t.state.name == "COMPLETE"]
    assert len(interrupted) == 1 and completed
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming interrupted trials {interrupted} from their last checkpoints" in second.stdout

    trials = optuna.load_study(study_name="t", storage=storage).trials
    states = {t.number: t.state.name for t in trials}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE"}  # the interrupted trial finished, none rerun
    resumed = next(t for t in trials if t.number == interrupted[0])
    assert resumed.params == next(t for t in before if t.number == interrupted[0]).params
    assert all(states[n] == "COMPLETE" for n in completed)  # nothing finished before the kill was lost

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("fashion-cir-sweeps")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("optuna.role") == "parent"]
    assert len(parent) == 1  # the resumed sweep reused its parent run
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    # One MLflow run per trial that got as far as logging (a trial killed at once may have none).
    child_trials = [int(r.data.tags["optuna.trial"]) for r in children]
    assert sorted(child_trials) == [0, 1, 2]  # the resumed trial logged into its own run, not a new one
    run = next(r for r in children if int(r.data.tags["optuna.trial"]) == interrupted[0])
    # Epoch 0 validated before the kill, epoch 1 after the resume: it went on from its checkpoint.
    # (By steps: a kill after the final checkpoint is scored again at the last step on resume.)
    assert len({m.step for m in client.get_metric_history(run.info.run_id, "val/recall_at_10")}) == 2
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"best.yaml", "optimization_history.png", "param_importances.png", "sweep.yaml"} <= artifacts
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: -t.value)
    tags = parent[0].data.tags
    assert float(tags["best.model.init_args.loss.init_args.temperature"]) == pytest.approx(
        best.params["model.init_args.loss.init_args.temperature"])

    from cir.lightning_cli import build_cli

    best_yaml = tmp_path / "sweeps" / "t" / "best.yaml"
    cli = build_cli(["--config", str(best_yaml), f"--data.init_args.data_dir={small_data}",
                     "--data.init_args.products=120", "--data.init_args.generator_seed=3",
                     "--data.init_args.val_fraction=0.25"], run=False)
    assert cli.model.loss.temperature == pytest.approx(best.params["model.init_args.loss.init_args.temperature"])

    from cir.compare import main as compare

    capsys.readouterr()
    compare(["--experiment", "fashion-cir-sweeps", "--tracking-uri", env["MLFLOW_TRACKING_URI"],
             "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert {"run", "stage", "family", "two_stage", "combiner", "synth_studio", "avg", "minutes"} <= set(header)
    assert "*" in printed
    csv_rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    evaluated = [c for c in children if "val/synth_studio/recall_at_10" in c.data.metrics]
    assert len(evaluated) >= 3  # the killed trial may have died before its first validation
    assert len(csv_rows) == 1 + len(evaluated)  # header + one row per evaluated trial; the parent has none
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("| run | stage | family |")
    assert all(row.split(",")[1] == "fit" for row in csv_rows[1:])  # every trial is a fit run


@pytest.mark.slow
def test_a_trial_killed_after_its_final_checkpoint_is_scored_from_it(small_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The window the kill test above hits only by chance: every epoch done and ``last.ckpt``
    written, the study not yet told. Resuming has nothing left to train, and must still report the
    trial's own value (the one the uninterrupted trial computed), not fail for want of a metric."""
    import optuna
    import yaml

    from cir.sweep import Sweep, SweepConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "experiment": str(DEMO), "study_name": "w", "metric": "val/recall_at_10", "n_trials": 1,
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "output_dir": str(tmp_path / "sweeps"),
        "sampler": {"name": "RandomSampler", "seed": 0}, "pruner": {"name": "NopPruner"},
        "overrides": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                      f"--data.init_args.data_dir={small_data}", "--data.init_args.products=120",
                      "--data.init_args.generator_seed=3", "--data.init_args.val_fraction=0.25",
                      "--data.init_args.num_workers=0", "--data.init_args.batch_size=8",
                      "--trainer.enable_progress_bar=false"],
        "search_space": {"model.init_args.loss.init_args.temperature": {"type": "float", "low": 0.03,
                                                                        "high": 0.2}},
    }))
    config = SweepConfig.load(sweep_file)
    first = Sweep(config)
    trial = first.study.ask()
    uninterrupted = first.objective(trial)  # trains to the end and writes last.ckpt; never told
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    first.study._storage.set_trial_user_attr(trial._trial_id, "pid", int(dead.stdout))  # as if killed
    assert (first.trial_dir(trial.number) / "checkpoints" / "last.ckpt").is_file()

    second = Sweep(config)
    assert [t.number for t in second.orphans] == [trial.number]
    study = second.run()
    (done,) = study.trials
    assert done.state == optuna.trial.TrialState.COMPLETE
    assert done.params == trial.params
    assert done.value == pytest.approx(uninterrupted)
