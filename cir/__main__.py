"""cir: one command for everything the framework does (python -m cir works the same way).

    cir fit|validate|test|predict --config EXP   the LightningCLI (the same as lightning)
    cir data ...      shard folders from the generator or the real datasets
    cir caption ...   MLLM captions of a shard folder (LLaVA-caption CIR)
    cir build ...     CIR training data from a catalogue of photos (the FashionMV pipeline)
    cir search ...    saved faiss gallery indexes: build, query
    cir index ...     a catalogue of product photos (no triplets) as a saved gallery index
    cir query ...     interactive queries (KV-cached for ProCIR's two-stage dialogue)
    cir serve ...     a trained model as an HTTP service with a web page over its gallery
    cir mine-negatives ...  offline hard negatives for training, mined with a trained model
    cir sweep ...     Optuna sweeps over any config key
    cir compare ...   MLflow runs as an ablation table or the papers' tables
    cir export ...    a LoRA run's checkpoint with the adapters merged into the weights
    cir --version     the installed version

cir <command> --help explains each. The older hyphenated scripts (cir-data, cir-caption,
cir-search, cir-query, cir-sweep, cir-compare) remain as aliases for this release.
"""


from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_CLI = "cir.lightning_cli"
DISTRIBUTION = "fashion-cir"
# Subcommand → module with a ``main(argv)``; imported only when run, so ``cir data`` never loads a model.
COMMANDS = {
    "data": "cir.data",
    "caption": "cir.caption",
    "build": "cir.build",
    "search": "cir.search",
    "index": "cir.index",
    "query": "cir.query",
    "serve": "cir.serve.command",
    "sweep": "cir.sweep",
    "compare": "cir.compare",
    "export": "cir.export",
    "mine-negatives": "cir.mine",
}


def version() -> str:
    """The installed distribution's version (what ``pip`` installed, not a copy kept in the code)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed; pip install -e . from the repository)"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[0] in ("-V", "--version"):
        print(f"cir ({DISTRIBUTION}) {version()}")
        return
    command, rest = argv[0], argv[1:]
    if command in TRAINER_COMMANDS:
        importlib.import_module(LIGHTNING_CLI).main(argv)
        return
    if command not in COMMANDS:
        known = [*TRAINER_COMMANDS, *COMMANDS]
        close = difflib.get_close_matches(command, known, n=1)
        hint = f" (did you mean 'cir {close[0]}'?)" if close else ""
        raise SystemExit(f"cir: unknown command {command!r}{hint}; the commands are {', '.join(known)}")
    sys.argv[0] = f"cir {command}"
    if asks_for_help(rest) and help_without_model_code(COMMANDS[command], rest):
        return
    importlib.import_module(COMMANDS[command]).main(rest)


def asks_for_help(args: Sequence[str]) -> bool:
    """``-h``/``--help`` among the command's own options (those after ``--`` belong to the config)."""
    own = args[:list(args).index("--")] if "--" in args else args
    return any(a in ("-h", "--help") for a in own)


# Help without model code
# -----------------------
# Every command module imports its model code at the top (torch, Lightning, transformers, every
# family through ``lightning_modules``): seconds before a help text that needs none of it. For
# help, the module is imported with every third-party package (and the project's model, data and
# callback packages) deferred: importing them gives placeholders that may be passed around (a base
# class, a decorator, an annotation) but not read. A parser that reads one (a default, a list of
# choices from model code) raises ``NeedsModelCode``, and the help is then made the ordinary way
# (slowly, but never wrong). Everything imported meanwhile is dropped from ``sys.modules`` after.

LIGHT_PACKAGES = frozenset({"cir", "argparse", "yaml"})
# Modules of the model packages that a parser reads (choices, defaults) and that import only the
# standard library: imported for real (their packages' ``__init__`` runs on placeholders).
# datamodules.lazy: every package __init__ makes its namespace with it (and imports nothing else).
LIGHT_MODULES = frozenset({"lightning_modules.construction.prompts", "datamodules.lazy"})


class NeedsModelCode(Exception):
    """A parser read a name of a deferred module: its help needs the real import."""


class Placeholder:
    """A name imported from a deferred module. Using it to build things gives more placeholders;
    reading its value (text, items, length, truth) raises ``NeedsModelCode``."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str) -> Placeholder:
        if attr.startswith("__"):  # protocols (copy, pickle, functools.wraps) probe dunders: absent
            raise AttributeError(attr)
        return Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:  # a decorator, a factory at import time
        return Placeholder(f"{self._name}()")

    def __getitem__(self, key: Any) -> Placeholder:  # a generic alias, e.g. ``Annotated[Tensor, ...]``
        return Placeholder(f"{self._name}[]")

    def __or__(self, other: Any) -> Placeholder:  # ``Tensor | None`` evaluated at import time
        return self

    __ror__ = __or__

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (PlaceholderBase,)

    def __repr__(self) -> str:
        return f"<deferred {self._name}>"

    def _read(self, *args: Any, **kwargs: Any) -> Any:
        raise NeedsModelCode(self._name)

    __str__ = __format__ = __iter__ = __len__ = __bool__ = __contains__ = __int__ = __float__ = __index__ = _read


class PlaceholderBase:
    """The base of a class defined on a placeholder: defining it is fine, making one is real work."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise NeedsModelCode(cls.__qualname__)


class DeferredModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"{self.__name__}.{attr}")


class DeferringFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a ``DeferredModule`` for every module outside the standard library, ``LIGHT_PACKAGES``
    ``LIGHT_MODULES`` and ``command`` (the command's own module), with their parent packages."""

    def __init__(self, command: str) -> None:
        self.real = {".".join(parts[:i]) for name in (command, *LIGHT_MODULES)
                     for parts in [name.split(".")] for i in range(1, len(parts) + 1)}

    def find_spec(self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in LIGHT_PACKAGES or name in self.real:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=True)  # a package: submodules defer too

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return DeferredModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


@contextlib.contextmanager
def deferred_imports(command: str) -> Iterator[None]:
    before = set(sys.modules)
    finder = DeferringFinder(command)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        # Placeholders must not reach a later real import: drop every module made meanwhile (the
        # standard library's are real and stay), and its binding in its parent package, which
        # ``from cir import search`` would otherwise find.
        for name in set(sys.modules) - before:
            if name.partition(".")[0] in sys.stdlib_module_names:
                continue
            module = sys.modules.pop(name)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                delattr(sys.modules[parent], child)


def help_without_model_code(module: str, args: list[str]) -> bool:
    """Print ``module``'s help for ``args`` (which ask for it) without its model code. False when
    that cannot be done: the caller then imports the module as usual."""
    run: Callable[[list[str]], None]
    with deferred_imports(module):
        try:
            run = importlib.import_module(module).main
            run(args)  # argparse prints the help and raises SystemExit(0) before the command does anything
        except Exception as exc:  # NeedsModelCode, or import-time code that wanted a real module
            if os.environ.get("CIR_DEBUG", "") not in ("", "0"):
                print(f"cir: the help needs the model code ({type(exc).__name__}: {exc}); importing it",
                      file=sys.stderr)
            return False
    return True


if __name__ == "__main__":
    main()
