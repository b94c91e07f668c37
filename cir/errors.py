"""Short config errors: the key, what is wrong, the closest valid key and the fix, in a few lines.

jsonargparse reports a bad key or value as the whole usage text plus a tree of every Union subtype
it tried; the one useful line sits at the bottom. ``concise`` walks that tree and keeps the leaf:
the dotted key (``model.init_args.loss.init_args.temperatur``), the complaint, and for an unknown
option the closest accepted one: at the key's own level, else among the keys nested under the same
section (``model.init_args.temprature`` → ``model.init_args.loss.init_args.temperature``), and for
a ``class_path`` that does not import, the closest class there is. ``CIR_DEBUG=1`` (or ``--debug``
on the command line) prints jsonargparse's full message and tracebacks instead.

A mistake outside the config (a file that is not there, an ``--images`` file that is not an image,
Ctrl-C) is one line too: ``check_files``/``check_images`` before any model is built, and
``user_errors`` around a command for what only shows up later.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_PARSER_KEY = re.compile(r'^(?P<indent>\s*)(?:error: )?Parser key "(?P<key>[^"]+)":')
_CLASS = re.compile(r"^(?P<indent>\s*)- Problem with given class_path '(?P<cls>[^']+)':")
_NOT_ACCEPTED = re.compile(r"^(?P<indent>\s*)(?:- )?(?:Option|Key) '(?P<opt>[^']+)' is not (?:accepted|expected)")
_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: (?P<args>.+)")
_MISSING_ATTRIBUTE = re.compile(r"module '(?P<module>[^']+)' has no attribute '(?P<name>[^']+)'")
_NO_MODULE = re.compile(r"No module named '(?P<module>[^']+)'")
_NOT_IMPORTABLE = re.compile(r"Expected a dot import path string: (?P<path>\S+)")
# Packages whose classes a ``class_path`` names: searched for the nearest class to a typo.
REGISTRIES = ("lightning_modules", "datamodules", "callbacks", "lightning_modules.backbones")
_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value",
          "Parser key", "Problem with given class_path", "tip:")


def debug_requested() -> bool:
    return os.environ.get("CIR_DEBUG", "") not in ("", "0")


def verbose_requested() -> bool:
    """Library chatter (Lightning's tips, the GPU/TPU lines) is shown with CIR_VERBOSE=1 or CIR_DEBUG=1."""
    return debug_requested() or os.environ.get("CIR_VERBOSE", "") not in ("", "0")


def _exit(prog: str, message: str, exc: BaseException | None = None) -> SystemExit:
    """The one-line exit of ``prog``; under CIR_DEBUG the original exception is raised instead."""
    if exc is not None and debug_requested():
        raise exc
    return SystemExit(f"{prog}: {message}")


def check_files(prog: str, files: Iterable[tuple[str, str | Path | None]]) -> None:
    """One line for the first ``(option, path)`` whose file is not there (None: not given)."""
    for option, path in files:
        if path is None:
            continue
        if Path(path).is_dir():
            raise _exit(prog, f"{option} {path}: a folder, not a file", IsADirectoryError(path))
        if not Path(path).is_file():
            raise _exit(prog, f"{option} {path}: no such file", FileNotFoundError(path))


def check_images(prog: str, paths: Iterable[str | Path], option: str = "--images") -> None:
    """One line for the first path that is not a readable image: checked before the model is built
    (a model takes seconds to minutes to load; the image is read only after it)."""
    from PIL import Image, UnidentifiedImageError  # here: the help of a command never pays for it

    for path in paths:
        check_files(prog, [(option, path)])
        try:
            with Image.open(path) as image:
                image.verify()  # the header and structure, without decoding every pixel
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            reason = "not an image PIL can read" if isinstance(exc, UnidentifiedImageError) else f"unreadable ({exc})"
            raise _exit(prog, f"{option} {path}: {reason}", exc) from None


def one_line(exc: BaseException) -> str:
    """An exception's message as one line: an OSError from the system names its file."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Around a command: a file that turns out missing (a shard folder, a config fragment) ends in
    one line naming it, and Ctrl-C in ``interrupted`` (exit status 130, as a shell expects), not a
    traceback. CIR_DEBUG=1 keeps the traceback."""
    try:
        yield
    except KeyboardInterrupt:
        if debug_requested():
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        raise _exit(prog, one_line(exc), exc) from None


def endpoint_message(prog: str, exc: Any, flags: Mapping[str, str]) -> str:
    """One line for an ``EndpointUnavailable``: the URL, what answered, and the option of ``flags``
    (``url``, ``model``, ``key``) that would fix it."""
    if exc.kind == "connect":
        hint = f"is the server running? Check {flags['url']}"
    elif exc.kind == "timeout":
        hint = f"a stuck server, or a firewall that drops the packets? Check {flags['url']}"
    elif exc.kind == "model":
        hint = f"check {flags['model']} (or {flags['url']})"
    elif exc.status in (401, 403):
        hint = f"check the API key ({flags['key']})"
    elif exc.status == 404:
        hint = f"check {flags['url']} and {flags['model']}"
    else:
        hint = f"see the server's log, or check {flags['url']}"
    return f"{prog}: {exc}; {hint}"


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


def class_candidates(wanted: str) -> list[str]:
    """Class paths near a ``class_path`` that does not import: the public classes of its module (if
    that imports) and of the packages in ``REGISTRIES``."""
    modules = [wanted.rpartition(".")[0], *REGISTRIES] if "." in wanted else list(REGISTRIES)
    out: list[str] = []
    for name in dict.fromkeys(modules):
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that does not import has no candidates
            continue
        out += [f"{name}.{attr}" for attr, value in vars(module).items()
                if inspect.isclass(value) and not attr.startswith("_")]
    return out


def closest_class(wanted: str) -> str | None:
    """The registered class path nearest ``wanted``, comparing whole paths and, for a bare or
    mistyped module, the class names alone."""
    candidates = class_candidates(wanted)
    if near := closest(wanted, candidates):
        return near
    by_name = {c.rpartition(".")[2]: c for c in reversed(candidates)}  # the first package's class wins
    near = closest(wanted.rpartition(".")[2], by_name)
    return by_name[near] if near else None


def nested_keys(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """(dotted key, name) of every init argument under ``node`` (a ``{class_path, init_args}``
    mapping of the merged config at ``prefix``), at every depth: the ones its class accepts and the
    ones the config sets, each nested class followed into its own."""
    if not isinstance(node, Mapping):
        return
    init_args = node.get("init_args") if isinstance(node.get("init_args"), Mapping) else {}
    names = init_parameters(str(node["class_path"])) if node.get("class_path") else []
    for name in dict.fromkeys([*names, *init_args]):
        key = f"{prefix}.init_args.{name}"
        yield key, name
        yield from nested_keys(init_args.get(name), key)


def _at(config: Mapping[str, Any] | None, keys: list[str]) -> Any:
    """The merged config's node at the dotted section ``keys`` (``init_args`` between them)."""
    node: Any = config
    for i, key in enumerate(keys):
        if i:
            node = node.get("init_args") if isinstance(node, Mapping) else None
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def _deeper(opt: str, config: Mapping[str, Any] | None, keys: list[str], own: str) -> str | None:
    """The key nested below the section ``keys`` whose name is nearest ``opt``: for a key given at
    the wrong depth (``model.init_args.temprature`` for the loss's ``temperature``)."""
    if not keys:
        return None
    found = [(key, name) for key, name in nested_keys(_at(config, keys), ".init_args.".join(keys))
             if key.rpartition(".init_args.")[0] != own]  # the key's own level was searched already
    near = closest(opt, dict.fromkeys(name for _, name in found))
    return next(key for key, name in found if name == near) if near else None


def _class_hint(text: str, cls: str | None) -> str:
    """`` (did you mean CLASS?)`` for a class path that does not import, else nothing."""
    wanted = cls
    if m := _NOT_IMPORTABLE.search(text):
        wanted = m["path"]
    elif not (_MISSING_ATTRIBUTE.search(text) or _NO_MODULE.search(text)):
        return ""
    near = closest_class(wanted) if wanted else None
    return f" (did you mean {near}?)" if near and near != wanted else ""


def concise(message: str, known_options: Iterable[str] = (), config: Mapping[str, Any] | None = None) -> str:
    """The few lines a user needs from a jsonargparse error ``message``; ``config`` (the merged
    config files, when known) lets a key at the wrong depth be found where it belongs."""
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
            if not near and (deeper := _deeper(m["opt"], config, keys, dotted)):
                hint = f" (did you mean {deeper}?)"
            owner = f" of {cls}" if cls else ""
            return f"{key}: no such key{owner}{hint}"
        text = text.removeprefix("- ")
        if not cls and (m := _NOT_IMPORTABLE.search(message)):
            text += _class_hint(m[0], None)  # a bare class name: the message's first lines are the noise
        else:
            text += _class_hint(text, cls)
        return f"{dotted}: {text}" if dotted else text
    return message.strip().splitlines()[-1] if message.strip() else "invalid configuration"


def report(prog: str, detail: str) -> str:
    return (f"{prog}: error in the configuration\n  {detail}\n"
            f"  Every key and its type: {prog} --help, or --print_config for the resolved config. "
            "The full message: CIR_DEBUG=1.")
