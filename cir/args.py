"""Argument handling shared by every ``cir`` subcommand.

Two things each command needs: options after ``--`` go to the experiment config (LightningCLI
syntax, e.g. ``-- --data.init_args.data_dir=data/fashionmv``), and ``sys.argv`` is cleared once
our own options are parsed, because LightningCLI, which parses the model config inside several
commands, warns when ``sys.argv`` holds arguments it was not given.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the command's own options, the config overrides after ``--``)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
          passthrough: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv`` (default: the command line), then clear ``sys.argv`` for LightningCLI."""
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    if extra and not passthrough:
        parser.error("this command takes no config overrides after '--'")
    args = parser.parse_args(own)
    sys.argv = sys.argv[:1]
    return args, extra


# ``literal`` (reStructuredText, for the docs built from docstrings) reads as noise at a terminal.
_RST_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def plain(text: str) -> str:
    """``text`` without reStructuredText markup: ``x`` → x, a trailing ``::`` → ``:``."""
    return re.sub(r"::$", ":", _RST_LITERAL.sub(r"\1", text), flags=re.MULTILINE)


_NO_HELP = "(no help)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its examples keep their lines), each option's default shown.

    Like ``argparse.ArgumentDefaultsHelpFormatter``, but also for options without a help text, and
    not where the default says nothing (None, False, an empty list) or the help already explains it.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):
            action = copy.copy(action)
            action.help = _NO_HELP  # argparse expands only a non-blank help; this one becomes the default alone
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = "" if action.help in (None, _NO_HELP) else action.help
        if _shows_default(action) and "%(default)" not in text and "default:" not in text:
            # A list as it is typed (--splits train val), not as Python prints it.
            value = action.default
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            text = f"{text.strip()} (default: {shown.replace('%', '%%')})".lstrip()
        return text

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Not at hyphens: option names and experiment names (--tracking-uri, fashion-cir) stay whole.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def format_help(self) -> str:
        return plain(super().format_help())


def _shows_default(action: argparse.Action) -> bool:
    # Identity, not equality: a default of 0 (``--seed``) is worth showing, False (a switch) is not.
    if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.default in ([], ""):
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with ``HelpFormatter``; its subcommands' parsers (same class) get it too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def command_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    return CommandParser(prog=f"cir {name}", description=doc)


def add_weights_options(parser: argparse.ArgumentParser, untrained_use: str) -> None:
    """``--config``, ``--ckpt`` and ``--untrained`` of a command that answers queries with a model
    (``models.require_weights`` then wants exactly one of the last two); ``untrained_use`` says what
    the initial weights are for in this command ("answer with", "serve", ...)."""
    parser.add_argument("--config", action="append", required=True,
                        help="experiment YAML of the trained model (repeatable)")
    parser.add_argument("--ckpt", default=None, help="checkpoint with the trained weights (loaded weights-only)")
    parser.add_argument("--untrained", action="store_true",
                        help=f"{untrained_use} the experiment's initial weights (no --ckpt): for trying the "
                        "command only")


def add_index_options(parser: argparse.ArgumentParser) -> None:
    """How a gallery index is built (``cir search build``, ``cir index``): the faiss kind and what
    an approximate index keeps."""
    parser.add_argument("--kind", default="flat",
                        help="flat (exact), ivf, hnsw, ivfpq (OPQ + IVF + product codes: the least memory), or any "
                        "faiss factory string such as 'OPQ32_128,IVF1024,PQ32' (inner product)")
    parser.add_argument("--store-vectors", action="store_true",
                        help="keep the float vectors beside the index (memory-mapped) for exact re-ranking")
    parser.add_argument("--rerank", type=int, default=0,
                        help="default number of candidates re-scored exactly (needs --store-vectors)")
    parser.add_argument("--nprobe", type=int, default=None, help="default inverted lists searched (ivf, ivfpq)")
    parser.add_argument("--ef-search", type=int, default=None, help="default HNSW search breadth (hnsw)")
    parser.add_argument("--on-disk", action="store_true",
                        help="map an IVF index's inverted lists from disk when loading (indexes larger than memory)")


def index_build_options(args: argparse.Namespace) -> dict[str, Any]:
    """``GalleryIndex.build`` keyword arguments from ``add_index_options``."""
    return {"store_vectors": args.store_vectors, "rerank": args.rerank, "on_disk": args.on_disk}


def configure_index(index: Any, args: argparse.Namespace) -> None:
    """Query defaults saved with an index (``GalleryIndex.configure``)."""
    if args.nprobe is not None or args.ef_search is not None:
        index.configure(nprobe=args.nprobe, ef_search=args.ef_search)


def add_query_knobs(parser: argparse.ArgumentParser) -> None:
    """Per-query knobs of an approximate index (the index's saved defaults when left out)."""
    parser.add_argument("--nprobe", type=int, default=None, help="inverted lists searched (ivf, ivfpq)")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth (hnsw)")
    parser.add_argument("--rerank", type=int, default=None, help="candidates re-scored exactly (stored vectors)")
