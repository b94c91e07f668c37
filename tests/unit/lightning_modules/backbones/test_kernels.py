"""The fast-kernel guard of Qwen3.5's linear attention: what transformers will call, the
once-per-process warning, and the delta-rule check (its harness on the CPU against transformers'
token-by-token recurrence; fla's kernel against the reference where a GPU and fla are present)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback
from transformers.models.qwen3_5 import modeling_qwen3_5

from lightning_modules.backbones import kernels
from lightning_modules.backbones.registry import get_preset

FUNCTIONS = {"fla": ("torch_chunk_gated_delta_rule", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
             "causal_conv1d": ("causal_conv1d_fn", "causal_conv1d", "causal_conv1d_fn")}


def install_fake_kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[..., Any]]:
    """Importable stand-ins for fla and causal_conv1d, and transformers' Qwen3.5 functions rebuilt
    with transformers' own fallback decorator while they are importable, as at a real import."""
    fakes = {}
    for package, (name, module_path, kernel_name) in FUNCTIONS.items():
        parts = module_path.split(".")
        for i in range(1, len(parts) + 1):
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        for i in range(1, len(parts)):
            setattr(sys.modules[".".join(parts[:i])], parts[i], sys.modules[".".join(parts[: i + 1])])

        def kernel(*args: Any, **kwargs: Any) -> None:
            return None

        kernel.__module__ = module_path
        setattr(sys.modules[module_path], kernel_name, kernel)
        reference = inspect.unwrap(getattr(modeling_qwen3_5, name))
        wrapped = use_kernel_func_from_hub_with_fallback(kernel_name, package)(reference)
        monkeypatch.setattr(modeling_qwen3_5, name, wrapped)
        fakes[package] = kernel
    monkeypatch.setattr(kernels, "_version", lambda distribution: "9.9")
    return fakes


def test_on_this_machine_transformers_runs_the_pytorch_reference() -> None:
    if any(importlib.util.find_spec(p) for p in kernels.PACKAGES):
        pytest.skip("a fast-kernel package is installed here")
    status = kernels.fast_kernels_status()
    assert not status.fast
    assert all(p.used is False and p.version is None and not p.importable for p in status.packages.values())
    chunk = kernels.resolved_implementation(modeling_qwen3_5.torch_chunk_gated_delta_rule)
    assert chunk is inspect.unwrap(modeling_qwen3_5.torch_chunk_gated_delta_rule)  # the reference itself


def test_the_status_reads_the_kernel_transformers_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = install_fake_kernels(monkeypatch)
    assert kernels.resolved_implementation(modeling_qwen3_5.torch_chunk_gated_delta_rule) is fakes["fla"]
    status = kernels.fast_kernels_status()
    assert status.fast and status.describe() == "flash-linear-attention 9.9: used; causal-conv1d 9.9: used"


def test_an_importable_package_transformers_did_not_pick_up_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed after transformers imported Qwen3.5: importable, yet the reference still runs."""
    install_fake_kernels(monkeypatch)
    reference = inspect.unwrap(modeling_qwen3_5.torch_chunk_gated_delta_rule)
    monkeypatch.setitem(sys.modules, "fla", None)
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule",
                        use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "fla")(reference))
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    fla = kernels.fast_kernels_status().packages["fla"]
    assert fla.importable and fla.used is False and "does not call it" in fla.describe()


def test_the_slow_path_warning_comes_once_per_process_and_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_checked_cuda", False)
    monkeypatch.setattr(kernels, "fast_kernels_status", lambda: kernels.KernelStatus({
        "fla": kernels.PackageStatus("fla", "flash-linear-attention", None, False, "", False),
        "causal_conv1d": kernels.PackageStatus("causal_conv1d", "causal-conv1d", "1.7.0", True, "", True)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels.warn_if_slow("cpu")
        assert not kernels.warn_if_slow("cuda", torch.nn.Linear(2, 2))  # no linear attention: nothing to speed up
    with pytest.warns(kernels.SlowKernelWarning) as record:
        assert kernels.warn_if_slow(torch.device("cuda", 0))
        assert not kernels.warn_if_slow("cuda")
    assert len(record) == 1
    message = str(record[0].message)
    assert "without flash-linear-attention (" in message and "causal-conv1d and" not in message
    assert "huggingface/transformers#48718" in message and "'flash-linear-attention==0.6.0'" in message


def test_a_fast_setup_does_not_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_kernels(monkeypatch)
    monkeypatch.setattr(kernels, "_checked_cuda", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels.warn_if_slow("cuda")


SMALL = kernels.DeltaRuleShape(batch=1, tokens=80, key_heads=2, value_heads=2, key_dim=16, value_dim=16)


def test_the_check_agrees_for_two_exact_algorithms_and_catches_a_wrong_one() -> None:
    """The chunked reference against transformers' token-by-token recurrence (an independent exact
    algorithm; 80 tokens leave a partial chunk): equal to fp32 rounding. A kernel with beta off by
    3% must fail the check's tolerance on the output and on dbeta."""
    recurrent = inspect.unwrap(modeling_qwen3_5.torch_recurrent_gated_delta_rule)
    errors = kernels.check_delta_rule(SMALL, torch.float32, "cpu", fast=recurrent)
    assert set(errors) == set(kernels.CHECKED) and max(errors.values()) < 1e-4

    def off(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            **kwargs: Any) -> Any:
        return recurrent(q, k, v, g=g, beta=beta * 0.97, **kwargs)

    wrong = kernels.check_delta_rule(SMALL, torch.float32, "cpu", fast=off)
    assert wrong["output"] > kernels.TOLERANCE[torch.float32] and wrong["dbeta"] > kernels.TOLERANCE[torch.float32]


def qwen_0_8b_shape() -> kernels.DeltaRuleShape:
    """Qwen3.5-0.8B's linear-attention layer (the preset built from its published config) at a
    ProCIR query's length: five 512² views (256 tokens each) and ~100 text tokens, not a multiple
    of the 64-token chunk."""
    text = get_preset("qwen3.5", "qwen3.5-0.8b-random").config["text"]
    return kernels.DeltaRuleShape(batch=2, tokens=5 * 256 + 100, key_heads=text["linear_num_key_heads"],
                                  value_heads=text["linear_num_value_heads"], key_dim=text["linear_key_head_dim"],
                                  value_dim=text["linear_value_head_dim"])


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("fla") is None,
                    reason="needs a CUDA GPU and flash-linear-attention")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fla_matches_the_reference_on_qwen_0_8b_shapes(dtype: torch.dtype) -> None:
    shape = qwen_0_8b_shape()
    assert (shape.key_heads, shape.value_heads, shape.key_dim) == (16, 16, 128)
    errors = kernels.check_delta_rule(shape, dtype, "cuda")
    bad = {name: err for name, err in errors.items() if not err <= kernels.TOLERANCE[dtype]}
    assert not bad, f"fla {dtype} relative errors above {kernels.TOLERANCE[dtype]}: {bad} (all: {errors})"
