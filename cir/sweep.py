"""``cir sweep``: Optuna hyperparameter sweeps over any config key, every trial a LightningCLI run.

A sweep file (``experiments/sweeps/<name>.yaml``)::

    experiment: ../demos/llava_caption.yaml             # the base experiment (path relative to this file)
    study_name: demo
    metric: val/recall_at_10
    direction: maximize
    n_trials: 3
    storage: sqlite:///optuna.db         # or journal:optuna.log (several workers, one machine),
                                         # or postgresql://user@host/db (workers on many machines)
    sampler: {name: TPESampler, seed: 0}
    pruner: {name: MedianPruner, n_warmup_steps: 1}
    overrides: [--trainer.max_epochs=3]  # applied to every trial
    search_space:
      model.init_args.loss.init_args.temperature: {type: float, low: 0.03, high: 0.2, log: true}
      model.init_args.fusion.init_args.dropout: {type: categorical, choices: [0.1, 0.5]}

Running the same command again continues the same study: completed and pruned trials are kept,
a trial left RUNNING by a killed process of this machine resumes with its own parameters from its
own ``last.ckpt`` (or from the start if it died before its first checkpoint) and logs into its own
MLflow run, then only the missing trials run. RDB storages fail stale trials of other machines by
heartbeat. Every trial is an
MLflow run nested under one parent run per study; the parent gets the best params and value, the
optimisation-history and parameter-importance plots, and ``best.yaml``, a ready-to-run experiment.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import optuna
import yaml
from optuna.trial import TrialState

from callbacks.tracking import resolve_tracking_uri
from lightning_modules.core.checkpoints import checkpoint_metadata

from .args import command_parser, parse
from .lightning_cli import build_cli

ParamType = Literal["float", "int", "categorical"]


@dataclass
class SweepConfig:
    experiment: str
    search_space: dict[str, dict[str, Any]]
    metric: str = "val/score"
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = 10
    study_name: str = "sweep"
    storage: str = "sqlite:///optuna.db"
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "TPESampler", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "MedianPruner", "n_warmup_steps": 1})
    overrides: list[str] = field(default_factory=list)
    output_dir: str = "outputs/sweeps"
    mlflow_experiment: str = "fashion-cir-sweeps"

    @classmethod
    def load(cls, path: str | Path) -> SweepConfig:
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        known = set(cls.__dataclass_fields__)
        problems = [f"unknown key {k!r}" for k in raw if k not in known]
        problems += [f"missing key {k!r}" for k in ("experiment", "search_space") if k not in raw]
        for key, spec in (raw.get("search_space") or {}).items():
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind not in ("float", "int", "categorical"):
                problems.append(f"search_space.{key}: type must be float, int or categorical, got {kind!r}")
            elif kind == "categorical" and not spec.get("choices"):
                problems.append(f"search_space.{key}: categorical needs a non-empty 'choices' list")
            elif kind in ("float", "int") and not ("low" in spec and "high" in spec):
                problems.append(f"search_space.{key}: {kind} needs 'low' and 'high'")
        if raw.get("direction", "maximize") not in ("maximize", "minimize"):
            problems.append(f"direction: 'maximize' or 'minimize', got {raw['direction']!r}")
        for name, group in (("sampler", optuna.samplers), ("pruner", optuna.pruners)):
            spec = raw.get(name)
            if spec is not None and not hasattr(group, str(spec.get("name"))):
                problems.append(f"{name}.name: no optuna.{group.__name__.split('.')[-1]}.{spec.get('name')}")
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        cfg = cls(**raw)
        cfg.experiment = str((path.parent / cfg.experiment).resolve())
        if not Path(cfg.experiment).is_file():
            raise FileNotFoundError(f"{path}: experiment {cfg.experiment} not found")
        return cfg


def make_storage(url: str) -> optuna.storages.BaseStorage | str:
    """SQLite/RDB URL (heartbeats fail stale trials of dead workers) or ``journal:FILE``."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)


def orphaned_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The RUNNING trials started on this machine by a process that no longer exists."""
    host = socket.gethostname()
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("host") == host and not _alive(t.user_attrs.get("pid"))]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()


def suggest(trial: optuna.Trial, key: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "float":
        return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
    if spec["type"] == "int":
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
    return trial.suggest_categorical(key, spec["choices"])


def nested(params: dict[str, Any]) -> dict[str, Any]:
    """{"a.b.c": 1} → {"a": {"b": {"c": 1}}}: dotted config keys as a YAML-ready tree."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


class _CountsSteps(L.Callback):
    """How many training batches a fit ran (0: a resumed trial had nothing left to train)."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.count += 1


class Sweep:
    def __init__(self, config: SweepConfig) -> None:
        self.cfg = config
        self.out = Path(config.output_dir) / config.study_name
        self.out.mkdir(parents=True, exist_ok=True)
        sampler_spec = dict(config.sampler)
        pruner_spec = dict(config.pruner)
        self.study = optuna.create_study(
            study_name=config.study_name, storage=make_storage(config.storage), direction=config.direction,
            load_if_exists=True, sampler=getattr(optuna.samplers, sampler_spec.pop("name"))(**sampler_spec),
            pruner=getattr(optuna.pruners, pruner_spec.pop("name"))(**pruner_spec))
        self.orphans = orphaned_trials(self.study)
        self.parent_run_id = self._parent_run()

    def _parent_run(self) -> str:
        import mlflow

        client = mlflow.MlflowClient(resolve_tracking_uri())
        exp = client.get_experiment_by_name(self.cfg.mlflow_experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.cfg.mlflow_experiment)
        runs = client.search_runs([exp_id], f"tags.`optuna.study` = '{self.cfg.study_name}' and "
                                            "tags.`optuna.role` = 'parent'")
        if runs:
            return runs[0].info.run_id
        run = client.create_run(exp_id, run_name=f"sweep-{self.cfg.study_name}",
                                tags={"optuna.study": self.cfg.study_name, "optuna.role": "parent"})
        client.log_artifact(run.info.run_id, self._sweep_file_copy())
        return run.info.run_id

    def _sweep_file_copy(self) -> str:
        path = self.out / "sweep.yaml"
        path.write_text(yaml.safe_dump({k: getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__}))
        return str(path)

    def remaining(self) -> int:
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return max(0, self.cfg.n_trials - len(done))

    def trial_dir(self, number: int) -> Path:
        return self.out / f"trial-{number}"

    def objective(self, trial: optuna.Trial, ckpt_path: str | None = None) -> float:
        from optuna_integration import PyTorchLightningPruningCallback

        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {k: suggest(trial, k, spec) for k, spec in self.cfg.search_space.items()}
        tags = {"mlflow.parentRunId": self.parent_run_id, "optuna.study": self.cfg.study_name,
                "optuna.trial": str(trial.number)}
        args = ["--config", self.cfg.experiment, *self.cfg.overrides,
                *(f"--{k}={v}" for k, v in params.items()),
                f"--trainer.logger.init_args.experiment_name={self.cfg.mlflow_experiment}",
                f"--trainer.logger.init_args.run_name={self.cfg.study_name}-trial-{trial.number}",
                f"--trainer.logger.init_args.tags={json.dumps(tags)}",
                f"--trainer.default_root_dir={self.trial_dir(trial.number)}"]
        if ckpt_path:  # back into the trial's own MLflow run, as `lightning fit --ckpt_path` does
            run_id = checkpoint_metadata(ckpt_path).get("mlflow_run_id")
            if run_id:
                args.append(f"--trainer.logger.init_args.run_id={run_id}")
        cli = build_cli(args, run=False)
        pruning = PyTorchLightningPruningCallback(trial, monitor=self.cfg.metric)
        steps = _CountsSteps()
        cli.trainer.callbacks.extend([pruning, steps])
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        value = cli.trainer.callback_metrics.get(self.cfg.metric)
        if value is None and ckpt_path and not steps.count:
            # Killed after writing its final checkpoint but before the study heard the result: fit
            # restored the finished weights and had nothing left to run, so score those weights
            # (MLflow then holds the last step's values twice). Without the pruner, which must not
            # judge a trial again at a step it already reported.
            cli.trainer.callbacks.remove(pruning)
            cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
            value = cli.trainer.callback_metrics.get(self.cfg.metric)
        if value is None:
            raise KeyError(f"trial {trial.number} logged no {self.cfg.metric!r}; check 'metric' in the sweep file")
        return float(value)

    def resume_orphans(self) -> None:
        """Finish every interrupted trial of this machine with its own parameters (the stored
        suggestions are returned again) from its own last checkpoint, and record its outcome."""
        for frozen in self.orphans:
            trial = optuna.Trial(self.study, frozen._trial_id)
            last = self.trial_dir(frozen.number) / "checkpoints" / "last.ckpt"
            try:
                value = self.objective(trial, str(last) if last.is_file() else None)
            except optuna.TrialPruned:
                self.study.tell(trial, state=TrialState.PRUNED)
                continue
            except BaseException:
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            self.study.tell(trial, value)

    def run(self) -> optuna.Study:
        self.resume_orphans()
        n = self.remaining()
        if n:
            self.study.optimize(self.objective, n_trials=n, catch=(), gc_after_trial=True)
        self.report()
        return self.study

    def report(self) -> Path | None:
        """Best params/value, plots and best.yaml on the parent run; returns best.yaml's path."""
        import mlflow

        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            return None
        client = mlflow.MlflowClient(resolve_tracking_uri())
        best = self.study.best_trial
        # Tags, not params: MLflow params are immutable, and a resumed sweep may find a better trial.
        for k, v in best.params.items():
            client.set_tag(self.parent_run_id, f"best.{k}", str(v))
        client.log_metric(self.parent_run_id, f"best.{self.cfg.metric}", best.value, step=len(complete))
        client.set_tag(self.parent_run_id, "optuna.best_trial", str(best.number))
        best_yaml = self.out / "best.yaml"
        body = {"defaults": [self.cfg.experiment], **nested(best.params)}
        best_yaml.write_text(f"# Best of study {self.cfg.study_name!r}: trial {best.number}, "
                             f"{self.cfg.metric} = {best.value:.4f}.\n# lightning fit --config {best_yaml}\n"
                             + yaml.safe_dump(body, sort_keys=False))
        client.log_artifact(self.parent_run_id, str(best_yaml))
        for path in self._plots(len(complete)):
            client.log_artifact(self.parent_run_id, str(path))
        return best_yaml

    def _plots(self, n_complete: int) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        out = []
        plots = [("optimization_history.png", ovm.plot_optimization_history)]
        if n_complete >= 2 and len(self.cfg.search_space) >= 1:
            plots.append(("param_importances.png", ovm.plot_param_importances))
        for name, fn in plots:
            try:
                ax = fn(self.study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant objective
                print(f"cir sweep: no {name}: {exc}")
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.set_size_inches(11, 5)  # room for dotted config keys as axis labels
            fig.tight_layout()
            fig.savefig(self.out / name, dpi=100)
            plt.close(fig)
            out.append(self.out / name)
        return out


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("sweep", __doc__)
    parser.add_argument("--config", required=True, help="sweep YAML (experiments/sweeps/<name>.yaml)")
    parser.add_argument("--n-trials", type=int, default=None, help="override the sweep file's n_trials")
    args, _ = parse(parser, argv)
    config = SweepConfig.load(args.config)
    if args.n_trials is not None:
        config.n_trials = args.n_trials
    sweep = Sweep(config)
    if sweep.orphans:
        print(f"cir sweep: resuming interrupted trials {[t.number for t in sweep.orphans]} from their last checkpoints")
    print(f"cir sweep: study {config.study_name!r}: {sweep.remaining() - len(sweep.orphans)} new of "
          f"{config.n_trials} trials to run")
    study = sweep.run()
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if done:
        print(f"cir sweep: best trial {study.best_trial.number}: {config.metric} = {study.best_value:.4f} "
              f"with {study.best_params}; ready-to-run config: {sweep.out / 'best.yaml'}")

