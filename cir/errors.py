"""Short config errors: the key, what is wrong, the closest valid key and the fix, in a few lines.

jsonargparse reports a bad key or value as the whole usage text plus a tree of every Union subtype
it tried; the one useful line sits at the bottom. ``concise`` walks that tree and keeps the leaf:
the dotted key (``model.init_args.loss.init_args.temperatur``), the complaint, and for an unknown
option the closest accepted one. ``CIR_DEBUG=1`` (or ``--debug`` on the command line) prints
jsonargparse's full message and tracebacks instead.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Iterable

_PARSER_KEY = re.compile(r'^(?P<indent>\s*)(?:error: )?Parser key "(?P<key>[^"]+)":')
_CLASS = re.compile(r"^(?P<indent>\s*)- Problem with given class_path '(?P<cls>[^']+)':")
_NOT_ACCEPTED = re.compile(r"^(?P<indent>\s*)(?:- )?(?:Option|Key) '(?P<opt>[^']+)' is not (?:accepted|expected)")
_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: (?P<args>.+)")
_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value",
          "Parser key", "Problem with given class_path", "tip:")


def debug_requested() -> bool:
    return os.environ.get("CIR_DEBUG", "") not in ("", "0")


def init_parameters(class_path: str) -> list[str]:
    """The keyword arguments a class accepts, for suggestions (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def closest(wanted: str, options: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(wanted, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


def concise(message: str, known_options: Iterable[str] = ()) -> str:
    """The few lines a user needs from a jsonargparse error ``message``."""
    lines = message.splitlines()
    if m := _UNRECOGNIZED.search(message):
        out = []
        for arg in m["args"].split():
            key = arg.split("=", 1)[0]
            if not key.startswith("--"):
                continue
            near = closest(key, known_options)
            out.append(f"{key.lstrip('-')}: no such key" + (f" (did you mean {near.lstrip('-')}?)" if near else ""))
        return "\n".join(out) or message.strip()
    path: list[tuple[int, str]] = []  # (indent, parser key) of the enclosing levels
    classes: list[tuple[int, str]] = []
    for line in lines:
        if m := _PARSER_KEY.match(line):
            indent = len(m["indent"])
            path = [p for p in path if p[0] < indent] + [(indent, m["key"])]
            continue
        if m := _CLASS.match(line):
            indent = len(m["indent"])
            classes = [c for c in classes if c[0] < indent] + [(indent, m["cls"])]
            continue
        text = line.strip()
        if not text or any(text.startswith(n) or n in text for n in _NOISE):
            continue
        indent = len(line) - len(line.lstrip())
        keys = [k for i, k in path if i < indent]
        dotted = ".init_args.".join(keys)
        cls = next((c for i, c in reversed(classes) if i < indent), None)
        if m := _NOT_ACCEPTED.match(line):
            key = f"{dotted}.init_args.{m['opt']}" if dotted else m["opt"]
            near = closest(m["opt"], init_parameters(cls) if cls else [])
            hint = f" (did you mean {dotted + '.init_args.' if dotted else ''}{near}?)" if near else ""
            owner = f" of {cls}" if cls else ""
            return f"{key}: no such key{owner}{hint}"
        text = text.removeprefix("- ")
        return f"{dotted}: {text}" if dotted else text
    return message.strip().splitlines()[-1] if message.strip() else "invalid configuration"


def report(prog: str, detail: str) -> str:
    return (f"{prog}: error in the configuration\n  {detail}\n"
            f"  Every key and its type: {prog} --help, or --print_config for the resolved config. "
            "The full message: CIR_DEBUG=1.")
