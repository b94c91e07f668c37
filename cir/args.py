"""Argument handling shared by every ``cir`` subcommand.

Two things each command needs: options after ``--`` go to the experiment config (LightningCLI
syntax, e.g. ``-- --data.init_args.data_dir=data/fashionmv``), and ``sys.argv`` is cleared once
our own options are parsed, because LightningCLI, which parses the model config inside several
commands, warns when ``sys.argv`` holds arguments it was not given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def command_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"cir {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
