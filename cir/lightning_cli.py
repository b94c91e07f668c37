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

A mistake is one to three lines (``cir.errors``): a config file, ``--ckpt_path`` or shard folder that
is not there is named before the model, the data or the MLflow run is built. Lightning's tips and its
GPU/TPU lines are left out unless asked for (``--verbose``, ``CIR_VERBOSE=1`` or ``CIR_DEBUG=1``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import ActionConfigFile, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.mlflow_logging import LogConfigToMLflow
from datamodules import CatalogueDataModule, ShardDataModule, SyntheticDataModule
from datamodules.catalogue_data import resolve_layout
from datamodules.embedding_parts import ExportRefused
from datamodules.shards import read_manifest
from lightning_modules.core.checkpoints import checkpoint_metadata

from .errors import concise, debug_requested, one_line, report, verbose_requested

_CONFIG_FLAGS = ("--config", "-c")
# ``--ckpt_path`` values Lightning resolves itself (not file names).
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")
# Lines Lightning logs on every run that tell a user nothing about it: an advertisement for its
# cloud products and which accelerators exist. Shown with --verbose, CIR_VERBOSE=1 or CIR_DEBUG=1.
_CHATTER = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:")
_LIGHTNING_LOG = "lightning.pytorch.utilities.rank_zero"


# A command that only loads a model to answer queries (``cir query``…) does not train: the seed
# line says nothing there (an untrained model's seed is in its fingerprint).
_SEED_LOG, _SEED = "lightning.fabric.utilities.seed", ("Seed set to",)


class _Quiet(logging.Filter):
    def __init__(self, chatter: tuple[str, ...]) -> None:
        super().__init__()
        self.chatter = chatter

    def filter(self, record: logging.LogRecord) -> bool:
        return verbose_requested() or not str(record.msg).startswith(self.chatter)


def quiet_lightning(seed_too: bool = False) -> None:
    """Drop Lightning's chatter (``_CHATTER``; with ``seed_too`` the seed line) from its log;
    idempotent. The filter reads the environment per record: CIR_VERBOSE set later shows it."""
    for name, chatter in [(_LIGHTNING_LOG, _CHATTER), *([(_SEED_LOG, _SEED)] if seed_too else [])]:
        log = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in log.filters):
            log.addFilter(_Quiet(chatter))


# The last command line a ConciseArgumentParser parsed: its config files tell where a misplaced
# key belongs (``errors.concise``). jsonargparse's error() is not handed the arguments.
_PARSED: list[str] = []


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def config_tree(argv: list[str]) -> dict[str, Any]:
    """The config files of ``argv`` merged in order, with any ``--KEY.class_path=VALUE`` override
    (interpolations left unresolved): enough to know which class each section builds. Best effort:
    a file that does not load is skipped (the parser reports it)."""
    tree: dict[str, Any] = {}
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in _CONFIG_FLAGS and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                data = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError):
                continue
            tree = _merge(tree, data) if isinstance(data, dict) else tree
            continue
        key, sep, given = arg.removeprefix("--").partition("=")
        if key.endswith(".class_path") and arg.startswith("--"):
            given = given if sep else (argv[i + 1] if i + 1 < len(argv) else "")
            node: dict[str, Any] = {"class_path": given}
            for part in reversed(key.removesuffix(".class_path").split(".")):
                node = {part: node}
            tree = _merge(tree, node)
    return tree


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

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        _PARSED[:] = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error or debug_requested():
            super().error(message, ex)
            return
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [o for action in parser._actions for o in action.option_strings]
        detail = concise(message, options, config_tree(_PARSED))
        sys.stderr.write(report(parser.prog.replace(" [options]", ""), detail) + "\n")
        self.exit(2)


class CIRCLI(LightningCLI):
    def __init__(self, *args: Any, prog: str | None = None, needs_data: bool = True, **kwargs: Any) -> None:
        # ``prog`` (``cir query``…): a command's own CLI, which checks the files it names and
        # reports a mistake in one line under that name, as the console script does.
        # ``needs_data=False``: a command that reads only the DataModule's preprocessing (``cir
        # index`` embeds a catalogue), so the experiment's shard folder need not exist.
        self.prog = prog
        self.needs_data = needs_data
        quiet_lightning(seed_too=prog is not None)
        super().__init__(*args, **kwargs)

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
            if not self._user_facing or debug_requested():
                raise
            prog = self._prog()
            detail = concise(str(exc)) if "Does not validate" in str(exc) else f"{type(exc).__name__}: {exc}"
            sys.stderr.write(report(prog, detail).replace("error in the configuration", "could not build the run")
                             + "\n")
            raise SystemExit(2) from None

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except ExportRefused as exc:  # the exporter's refusals, raised inside the run: one line
            if not self._user_facing or debug_requested():
                raise
            raise SystemExit(f"{self._prog()}: {one_line(exc)}") from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--defaults", type=list[str] | None, default=None,
                            help="Config fragments this config starts from (resolved before parsing).")

    @property
    def _user_facing(self) -> bool:
        return self.concise_errors or self.prog is not None

    def _prog(self) -> str:
        if self.prog:
            return self.prog
        subcommand = self.config.get("subcommand") if isinstance(self.config, dict | Namespace) else None
        return f"lightning {subcommand}" if subcommand else "lightning"

    def _refuse(self, message: str, exc: Exception) -> None:
        """One line for a user (CIR_DEBUG: the exception), the exception for a library caller."""
        if not self._user_facing or debug_requested():
            raise exc
        raise SystemExit(f"{self._prog()}: {message}")

    def _check_data_dir(self, config: Any) -> None:
        """A shard folder that is not there, before the model is built: the DataModule reads its
        manifest only in setup, after a model that may take minutes to load. Generated data
        (``SyntheticDataModule``) is written on first use and is not checked."""
        data = config.get("data") if isinstance(config, dict | Namespace) else None
        if not isinstance(data, dict | Namespace) or not data.get("class_path"):
            return
        module, _, name = str(data["class_path"]).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return  # the instantiation names a class that does not import
        init_args = data.get("init_args") or {}
        if not isinstance(init_args, dict | Namespace):
            return
        if isinstance(cls, type) and issubclass(cls, CatalogueDataModule):  # the exporter's products
            try:
                resolve_layout(Path(str(init_args.get("source"))), init_args.get("layout") or "auto")
            except FileNotFoundError as exc:
                self._refuse(f"data.init_args.source: {one_line(exc)}", exc)
            return
        data_dir = init_args.get("data_dir")
        if not (isinstance(cls, type) and issubclass(cls, ShardDataModule)) or issubclass(cls, SyntheticDataModule):
            return
        try:
            read_manifest(data_dir or "data/synthetic")
        except FileNotFoundError as exc:
            self._refuse(one_line(exc), exc)

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
        subcommand = self.config.get("subcommand")
        if self._user_facing and self.needs_data:  # the first hook after parsing: before anything is built
            self._check_data_dir(self.config[subcommand] if subcommand else self.config)
        if subcommand:
            self._check_checkpoint_class(self.config[subcommand])
        super()._parse_ckpt_path()

    def _check_checkpoint_class(self, config: Any) -> None:
        given = config.get("ckpt_path")
        if given and given not in _CKPT_KEYWORDS and not Path(given).is_file() and self._user_facing:
            # Lightning would find out in trainer.validate(), after the model, the data and a
            # (then FAILED) MLflow run were made.
            self._refuse(f"--ckpt_path {given}: no such file", FileNotFoundError(given))
        path = resolve_ckpt_path(config.get("ckpt_path"), config.get("trainer", {}).get("default_root_dir") or ".")
        model = config.get("model")
        wanted = model.get("class_path") if isinstance(model, dict | Namespace) else None
        if path is None or not wanted:
            return
        message = checkpoint_class_mismatch(path, str(wanted), self._prog(), "--ckpt_path")
        if message is None:
            return
        if not self._user_facing or debug_requested():  # as _refuse: a library caller gets the exception
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


def build_cli(args: list[str] | None = None, run: bool = True, prog: str | None = None,
              needs_data: bool = True) -> CIRCLI:
    """The CLI over ``args`` (default: the command line); ``run=False`` only instantiates. With
    ``prog`` (the command using it, ``cir query``…) a config or shard folder that is not there ends
    the command in one line naming it (CIR_DEBUG=1: the exception)."""
    args = list(sys.argv[1:] if args is None else args)
    try:
        expanded = expand_defaults(args)
    except (FileNotFoundError, ValueError) as exc:
        if prog is None or debug_requested():
            raise
        raise SystemExit(f"{prog}: {one_line(exc)}") from None
    return CIRCLI(**_cli_kwargs(), args=expanded, run=run, prog=prog, needs_data=needs_data)


def _cli_kwargs() -> dict:
    return dict(
        # Any LightningModule: the retrieval families and ProCIR's SFT stage (an LM, not a retriever).
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,  # the shards, and the exporter's CatalogueDataModule
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
    if "--verbose" in argv:  # Lightning's own chatter (its tips, the GPU/TPU lines)
        argv.remove("--verbose")
        os.environ["CIR_VERBOSE"] = "1"
    try:
        sys.argv[1:] = expand_defaults(argv)
    except (FileNotFoundError, ValueError) as exc:  # a config file or a fragment it lists is not there
        if debug_requested():
            raise
        subcommand = next((a for a in argv if not a.startswith("-")), None)
        raise SystemExit(f"lightning{' ' + subcommand if subcommand else ''}: {one_line(exc)}") from None
    CIRCLI.concise_errors = True
    CIRCLI(**_cli_kwargs())


if __name__ == "__main__":  # torchrun -m cir.lightning_cli predict ... (multi-node launches)
    main()
