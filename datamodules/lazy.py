"""Package namespaces that import a name's module only when the name is first read (PEP 562).

A package ``__init__`` that imported every class it re-exports made each command pay for all of
them: ``cir compare`` loaded Qwen3.5, BLIP-2 and PEFT to read MLflow. With ``lazy_namespace`` the
names stay where configs and users find them (``class_path: lightning_modules.ProCIR``), and a
command imports the modules it uses. Type checkers read the same names from an
``if TYPE_CHECKING:`` block of imports kept beside the table.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_namespace(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a name to the module,
    relative to the package, that defines it; a name read once is kept in the package."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
