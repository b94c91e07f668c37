"""The tiny Qwen3.5, built once per test module of the families that use it."""

from __future__ import annotations

import pytest

from lightning_modules.backbones.qwen import QwenBackbone


@pytest.fixture(scope="module")
def backbone() -> QwenBackbone:
    return QwenBackbone("tiny").eval()
