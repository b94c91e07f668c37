"""The fast-kernel guard of Qwen3.5's linear attention: what transformers will call, the
once-per-process warning, and the delta-rule check (its harness on the CPU against transformers'
token-by-token recurrence; fla's kernel against the reference where a GPU and fla are present)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.integrations import hub_kernels
from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback
from transformers.models.qwen3_5 import modeling_qwen3_5

from lightning_modules.backbones import kernels
from lightning_modules.backbones.registry import get_preset

FUNCTIONS = {"fla": ("torch_chunk_gated_delta_rule", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
             "causal_conv1d": ("causal_conv1d_fn", "causal_conv1d", "causal_conv1d_fn")}
Decorator = Callable[[Callable[..., Any]], Any]


def plain_function_fallback(kernel_name: str, package: str, module_path: str) -> Decorator:
    """transformers 5.24's layout, rebuilt by hand so the test does not depend on the installed
    version: the fallback wrapper is returned as it is (no ``kernels`` module around it), a
    ``functools.wraps`` of the reference closing over ``implementation`` and ``torch_function``."""

    def decorator(torch_function: Callable[..., Any]) -> Callable[..., Any]:
        try:
            importlib.import_module(package)
            implementation = getattr(importlib.import_module(module_path), kernel_name)
        except Exception:
            implementation = torch_function

        @functools.wraps(torch_function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if implementation is torch_function:
                return torch_function(*args, **kwargs)
            return implementation(*args, **kwargs)

        return wrapped

    return decorator


def installed_fallback(kernel_name: str, package: str, module_path: str) -> Decorator:
    """The installed transformers' own decorator (5.25: the wrapper inside a ``kernels`` ``Func`` module)."""
    return use_kernel_func_from_hub_with_fallback(kernel_name, package)


def installed_fallback_without_kernels(kernel_name: str, package: str, module_path: str) -> Decorator:
    """The installed decorator with ``kernels``' layer replaced by the pass-through transformers uses
    when ``kernels`` is absent: transformers' own code producing the 5.24 layout."""
    if not hasattr(hub_kernels, "use_kernel_forward_from_hub"):
        pytest.skip("this transformers has no kernels layer to take out")
    layer = hub_kernels.use_kernel_forward_from_hub
    hub_kernels.use_kernel_forward_from_hub = lambda *args, **kwargs: (lambda function: function)
    try:
        return use_kernel_func_from_hub_with_fallback(kernel_name, package)
    finally:
        hub_kernels.use_kernel_forward_from_hub = layer


LAYOUTS = {"installed-transformers": installed_fallback, "transformers-5.24": plain_function_fallback,
           "installed-transformers-without-kernels": installed_fallback_without_kernels}


@pytest.fixture(params=list(LAYOUTS))
def fallback(request: pytest.FixtureRequest) -> Callable[[str, str, str], Decorator]:
    return LAYOUTS[request.param]


def install_fake_kernels(monkeypatch: pytest.MonkeyPatch,
                         fallback: Callable[[str, str, str], Decorator]) -> dict[str, Callable[..., Any]]:
    """Importable stand-ins for fla and causal_conv1d, and transformers' Qwen3.5 functions rebuilt
    with ``fallback`` while they are importable, as at a real import."""
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
        reference = kernels.reference_implementation(getattr(modeling_qwen3_5, name))
        monkeypatch.setattr(modeling_qwen3_5, name, fallback(kernel_name, package, module_path)(reference))
        fakes[package] = kernel
    monkeypatch.setattr(kernels, "_version", lambda distribution: "9.9")
    return fakes


def is_transformers_reference(function: Any, name: str) -> bool:
    """Checked without the module under test: the plain function defined in modeling_qwen3_5."""
    return (isinstance(function, types.FunctionType) and function.__module__ == modeling_qwen3_5.__name__
            and function.__qualname__ == name)


def test_on_this_machine_transformers_runs_the_pytorch_reference() -> None:
    if any(importlib.util.find_spec(p) for p in kernels.PACKAGES):
        pytest.skip("a fast-kernel package is installed here")
    status = kernels.fast_kernels_status()
    assert not status.fast
    assert all(p.used is False and p.version is None and not p.importable for p in status.packages.values())
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn"):
        reference = kernels.reference_implementation(getattr(modeling_qwen3_5, name))
        assert is_transformers_reference(reference, name)
        assert kernels.resolved_implementation(getattr(modeling_qwen3_5, name)) is reference


def test_the_status_reads_the_kernel_transformers_chose(monkeypatch: pytest.MonkeyPatch, fallback: Any) -> None:
    fakes = install_fake_kernels(monkeypatch, fallback)
    chunk = modeling_qwen3_5.torch_chunk_gated_delta_rule
    assert kernels.resolved_implementation(chunk) is fakes["fla"]
    assert is_transformers_reference(kernels.reference_implementation(chunk), "torch_chunk_gated_delta_rule")
    status = kernels.fast_kernels_status()
    assert status.fast and status.describe() == "flash-linear-attention 9.9: used; causal-conv1d 9.9: used"


def test_an_importable_package_transformers_did_not_pick_up_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                                       fallback: Any) -> None:
    """Installed after transformers imported Qwen3.5: importable, yet the reference still runs."""
    install_fake_kernels(monkeypatch, fallback)
    reference = kernels.reference_implementation(modeling_qwen3_5.torch_chunk_gated_delta_rule)
    monkeypatch.setitem(sys.modules, "fla", None)
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule",
                        fallback("chunk_gated_delta_rule", "fla", FUNCTIONS["fla"][1])(reference))
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    assert kernels.resolved_implementation(modeling_qwen3_5.torch_chunk_gated_delta_rule) is reference
    fla = kernels.fast_kernels_status().packages["fla"]
    assert fla.importable and fla.used is False and "does not call it" in fla.describe()


def reference(x: torch.Tensor) -> torch.Tensor:
    return x


def kernel(x: torch.Tensor) -> torch.Tensor:
    return x


def outer_decorator(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def logged(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return logged


def callable_object(function: Callable[..., Any]) -> Any:
    class Dispatch:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    return Dispatch()


def module_layer(function: Callable[..., Any]) -> Any:
    """kernels' function-to-module layer as transformers 5.25 applies it (identity without kernels)."""
    return hub_kernels.use_kernel_forward_from_hub("chunk_gated_delta_rule")(function)


class Holder:
    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


# Each builds a layering around a 5.24-style wrapper; the search must see through all of them.
LAYERINGS: dict[str, Callable[[Callable[..., Any]], Any]] = {
    "bare wrapper": lambda w: w,
    "kernels module": module_layer,
    "decorator over the kernels module": lambda w: outer_decorator(module_layer(w)),
    "callable object": callable_object,
    "partial of a callable object": lambda w: functools.partial(callable_object(outer_decorator(w))),
    "bound method": lambda w: Holder(w).call,
}


@pytest.mark.parametrize("layering", list(LAYERINGS))
@pytest.mark.parametrize("installed", [True, False], ids=["kernel-installed", "reference-only"])
def test_the_wrapper_is_found_through_any_layering(monkeypatch: pytest.MonkeyPatch, layering: str,
                                                   installed: bool) -> None:
    fake = types.ModuleType("fake_kernel_pkg")
    fake.kernel = kernel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_kernel_pkg", fake if installed else None)
    wrapper = plain_function_fallback("kernel", "fake_kernel_pkg", "fake_kernel_pkg")(reference)
    layered = LAYERINGS[layering](wrapper)
    assert kernels.resolved_implementation(layered) is (kernel if installed else reference)
    assert kernels.reference_implementation(layered) is reference
    assert layered(torch.ones(1)).item() == 1.0  # the layering still calls through


def test_a_function_without_a_wrapper_resolves_to_none_and_is_its_own_reference() -> None:
    assert kernels.resolved_implementation(reference) is None
    assert kernels.reference_implementation(outer_decorator(reference)) is reference
    with pytest.raises(LookupError):
        kernels.reference_implementation(torch.nn.Linear(2, 2))


def test_the_search_stops_on_cycles_and_at_its_depth() -> None:
    def cycle(*args: Any) -> Any:
        return cycle(*args)

    assert kernels.resolved_implementation(cycle) is None
    deep: Callable[..., Any] = plain_function_fallback("kernel", "missing_pkg", "missing_pkg")(reference)
    for _ in range(kernels._SEARCH_DEPTH):
        deep = outer_decorator(deep)
    assert kernels.resolved_implementation(deep) is reference
    assert kernels.resolved_implementation(outer_decorator(deep)) is None


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


def test_a_fast_setup_does_not_warn(monkeypatch: pytest.MonkeyPatch, fallback: Any) -> None:
    install_fake_kernels(monkeypatch, fallback)
    monkeypatch.setattr(kernels, "_checked_cuda", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels.warn_if_slow("cuda")


SMALL = kernels.DeltaRuleShape(batch=1, tokens=80, key_heads=2, value_heads=2, key_dim=16, value_dim=16)


def test_the_check_agrees_for_two_exact_algorithms_and_catches_a_wrong_one() -> None:
    """The chunked reference against transformers' token-by-token recurrence (an independent exact
    algorithm; 80 tokens leave a partial chunk): equal to fp32 rounding. A kernel with beta off by
    3% must fail the check's tolerance on the output and on dbeta."""
    recurrent = kernels.reference_implementation(modeling_qwen3_5.torch_recurrent_gated_delta_rule)
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
