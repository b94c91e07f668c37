"""Package namespaces resolve their names on first use (datamodules/lazy.py): every exported name
resolves to the object its module defines, and importing a package imports none of them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["datamodules", "callbacks", "lightning_modules", "lightning_modules.core", "lightning_modules.retrieval",
            "lightning_modules.components", "lightning_modules.backbones", "lightning_modules.generation"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_export_resolves_to_its_module_s_object(package: str) -> None:
    module = importlib.import_module(package)
    exports = module._EXPORTS
    assert sorted(module.__all__) == sorted(exports)  # what `import *` gives is what the table holds
    for name, where in exports.items():
        defining = importlib.import_module(where, package)
        assert getattr(module, name) is getattr(defining, name), f"{package}.{name}"
    assert set(exports) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        module.Nope  # noqa: B018


def test_importing_the_packages_loads_no_model_code() -> None:
    code = ("import sys, lightning_modules, datamodules, callbacks, lightning_modules.core, "
            "lightning_modules.backbones; "
            "print(sorted(m for m in ('transformers', 'lightning', 'peft', 'faiss', "
            "'lightning_modules.families.procir.model') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
