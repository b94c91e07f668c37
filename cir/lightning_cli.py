"""``lightning`` (and ``cir fit|validate|test|predict``): LightningCLI for every family and DataModule.

``lightning fit --config experiments/demos/clip4cir.yaml`` runs an experiment. Experiment files hold
overrides only and name the reusable fragments they start from under ``defaults:`` (paths relative
to the experiment file), e.g.::

    defaults:
      - ../../configs/trainer/cpu.yaml
      - ../../configs/model/clip4cir/tiny.yaml
    trainer:
      max_epochs: 3

The fragments are loaded first, in order, then the experiment file, then the command line, and
OmegaConf interpolation is resolved over the merged result. Write interpolations relative to the
key that holds them (``${.batch_size}`` for a sibling key, ``${....default_root_dir}``): under a subcommand the
config's root is ``fit.``/``validate.``…, so absolute ones would not resolve. ``${oc.env:VAR,x}``
reads the environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import ActionConfigFile, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.mlflow_logging import LogConfigToMLflow
from datamodules.datamodule import ShardDataModule
from lightning_modules.core.checkpoints import checkpoint_metadata

from .errors import concise, debug_requested, report

_CONFIG_FLAGS = ("--config", "-c")


def _defaults_of(path: Path, chain: tuple[Path, ...] = ()) -> list[Path]:
    """Fragments named under ``defaults:`` of ``path``, depth first, each before what includes it."""
    if path in chain:
        raise ValueError(f"config {path} includes itself through 'defaults': {' -> '.join(map(str, chain))}")
    if not path.is_file():
        where = f" (listed under 'defaults' in {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file {path} not found{where}")
    data = yaml.safe_load(path.read_text()) or {}
    names = (data.get("defaults") or []) if isinstance(data, dict) else []
    if not isinstance(names, list):
        raise ValueError(f"{path}: 'defaults' must be a list of config file paths, got {type(names).__name__}")
    out: list[Path] = []
    for name in names:
        fragment = (path.parent / name).resolve()
        out += _defaults_of(fragment, (*chain, path)) + [fragment]
    return out


def expand_defaults(argv: list[str]) -> list[str]:
    """Insert ``--config FRAGMENT`` before every ``--config FILE`` whose file lists ``defaults``.

    A file is loaded once: a fragment already given earlier is not inserted again. That also makes
    the expansion idempotent, which matters because DDP's launcher starts the other ranks with the
    already expanded command line (a second expansion would load fragments twice, and a
    ``callbacks+:`` in one of them would give those ranks a callback list rank 0 does not have)."""
    out: list[str] = []
    loaded: set[Path] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            value, consumed = argv[i + 1], 2
        elif arg.startswith("--config="):
            value, consumed = arg.split("=", 1)[1], 1
        if value is not None and value.endswith((".yaml", ".yml")):
            for fragment in _defaults_of(Path(value).resolve()):
                if fragment not in loaded:
                    out += ["--config", str(fragment)]
                    loaded.add(fragment)
            loaded.add(Path(value).resolve())
            out += argv[i : i + consumed]
            i += consumed
            continue
        out.append(arg)
        i += 1
    return out


class ConciseArgumentParser(LightningArgumentParser):
    """Reports a config mistake in a few lines (``cir.errors``); ``CIR_DEBUG=1`` for jsonargparse's own."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error or debug_requested():
            super().error(message, ex)
            return
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [o for action in parser._actions for o in action.option_strings]
        sys.stderr.write(report(parser.prog.replace(" [options]", ""), concise(message, options)) + "\n")
        self.exit(2)


class CIRCLI(LightningCLI):
    def init_parser(self, **kwargs: object) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={L.__version__}"])
        parser = ConciseArgumentParser(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile,
                            help="Path to a configuration file in json or yaml format.")
        return parser

    # The console scripts report a failure to build the model, data or trainer (a missing file, an
    # unreachable hub id, a refused value) in a few lines; library callers get the exception itself.
    concise_errors = False

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:
            if not self.concise_errors or debug_requested():
                raise
            prog = f"lightning {self.subcommand}" if self.subcommand else "lightning"
            detail = concise(str(exc)) if "Does not validate" in str(exc) else f"{type(exc).__name__}: {exc}"
            sys.stderr.write(report(prog, detail).replace("error in the configuration", "could not build the run")
                             + "\n")
            raise SystemExit(2) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--defaults", type=list[str] | None, default=None,
                            help="Config fragments this config starts from (resolved before parsing).")

    def before_instantiate_classes(self) -> None:
        """The MLflow run's name says the backbone and, outside ``fit``, the subcommand; resuming
        (``fit --ckpt_path``) logs into the MLflow run the checkpoint was written by."""
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        logger = config.trainer.get("logger")
        if logger is None or isinstance(logger, bool | list):
            return
        if not str(logger.get("class_path", "")).endswith(("MLflowLogger", "MLFlowLogger")):
            return
        logger.init_args.run_name = run_name(logger.init_args.get("run_name"), config, self.subcommand)
        if self.subcommand != "fit" or logger.init_args.get("run_id"):
            return
        path = resolve_ckpt_path(config.get("ckpt_path"), config.trainer.get("default_root_dir") or ".")
        if path is None:
            return
        checkpoint = checkpoint_metadata(path)
        if checkpoint.get("mlflow_run_id"):
            logger.init_args.run_id = checkpoint["mlflow_run_id"]

    def _parse_ckpt_path(self) -> None:
        """Lightning merges the hyperparameters of ``--ckpt_path`` into the config's ``model``, its
        ``class_path`` included: a checkpoint of another class would quietly replace the config's
        model (``validate --config CLIP4CIR.yaml --ckpt_path sprc.ckpt`` evaluated SPRC and logged it
        as the config's run). Refused first, in one line naming both classes, before anything is
        built or any MLflow run exists."""
        if self.config.get("subcommand"):
            self._check_checkpoint_class(self.config[self.config.subcommand])
        super()._parse_ckpt_path()

    def _check_checkpoint_class(self, config: Any) -> None:
        path = resolve_ckpt_path(config.get("ckpt_path"), config.get("trainer", {}).get("default_root_dir") or ".")
        model = config.get("model")
        wanted = model.get("class_path") if isinstance(model, dict | Namespace) else None
        if path is None or not wanted:
            return
        message = checkpoint_class_mismatch(path, str(wanted), f"lightning {self.config.subcommand}", "--ckpt_path")
        if message is None:
            return
        if not self.concise_errors or debug_requested():
            raise ValueError(message)
        raise SystemExit(message)


def checkpoint_class(path: str | Path) -> str | None:
    """The class path a Lightning checkpoint's hyperparameters name (``_class_path``, written by
    LightningCLI), read weights-only and memory-mapped; None for a bare state dict, a checkpoint
    made without the CLI or a file that does not load (its loader then reports why)."""
    try:
        checkpoint = checkpoint_metadata(path)
    except Exception:  # noqa: BLE001 - the real load of the same file reports the problem in full
        return None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    found = hparams.get("_class_path") if isinstance(hparams, dict) else None
    return found if isinstance(found, str) and found else None


def checkpoint_class_mismatch(path: str | Path, wanted: str, prog: str, option: str) -> str | None:
    """One line naming both classes when the checkpoint at ``path`` holds another model class than
    ``wanted`` (compared by class name: ``lightning_modules.CLIP4CIR`` and
    ``lightning_modules.families.clip4cir.model.CLIP4CIR`` are the same class, and a class path
    read from a file is never imported)."""
    found = checkpoint_class(path)
    if found is None or found.rpartition(".")[2] == wanted.rpartition(".")[2]:
        return None
    return (f"{prog}: {option} {path} holds a {found.rpartition('.')[2]} model ({found}) but the config builds "
            f"{wanted.rpartition('.')[2]} ({wanted}): give the experiment that checkpoint was trained with, "
            f"or a checkpoint of {wanted.rpartition('.')[2]}")


def run_name(name: str | None, config: Any, subcommand: str) -> str:
    """``{name}@{backbone}``, plus `` (validate)`` / `` (test)`` outside fit: the config's run name
    written for one backbone stays true when the backbone is overridden on the command line."""
    source = config
    for key in ("model", "init_args", "backbone", "init_args", "name_or_path"):
        source = source.get(key) if isinstance(source, dict | Namespace) else None
    out = name or "run"
    if source:
        out = f"{out}@{Path(str(source)).name}"
    return out if subcommand == "fit" else f"{out} ({subcommand})"


def resolve_ckpt_path(ckpt_path: str | None, default_root_dir: str) -> Path | None:
    """The file ``--ckpt_path`` names; ``last`` is ``{default_root_dir}/checkpoints/last.ckpt``."""
    if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return None
    path = Path(default_root_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    return path if path.is_file() else None


def build_cli(args: list[str] | None = None, run: bool = True) -> CIRCLI:
    """The CLI over ``args`` (default: the command line); ``run=False`` only instantiates."""
    return CIRCLI(**_cli_kwargs(), args=expand_defaults(list(sys.argv[1:] if args is None else args)), run=run)


def _cli_kwargs() -> dict:
    return dict(
        # Any LightningModule: the retrieval families and ProCIR's SFT stage (an LM, not a retriever).
        model_class=L.LightningModule,
        datamodule_class=ShardDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigToMLflow,
        save_config_kwargs={"overwrite": True},
        # No prefix abbreviations: --trainer.max_epoch must be an error, not max_epochs.
        parser_kwargs={"parser_mode": "omegaconf+", "allow_abbrev": False},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (returns None: a returned object would become the exit status)."""
    # LightningCLI reads sys.argv itself when given no args; hand it the expanded list that way.
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # the full jsonargparse messages and tracebacks
        argv.remove("--debug")
        os.environ["CIR_DEBUG"] = "1"
    sys.argv[1:] = expand_defaults(argv)
    CIRCLI.concise_errors = True
    CIRCLI(**_cli_kwargs())
