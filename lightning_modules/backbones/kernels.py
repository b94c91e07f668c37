"""The fast kernels of Qwen3.5's linear-attention layers: which are installed, which transformers
actually calls, a once-per-process warning when a CUDA run goes without them, and a check that the
gated delta-rule kernel's forward and backward agree with transformers' PyTorch reference.

transformers (5.x) decides once, when ``modeling_qwen3_5`` is imported, whether
``chunk_gated_delta_rule`` comes from flash-linear-attention (import name ``fla``) and
``causal_conv1d_fn`` from ``causal_conv1d``; without them it runs its own PyTorch versions (an
fp32 loop over 64-token chunks and a grouped ``conv1d``), correct but slow. Installing a package
after that import changes nothing for the running process, so the status below reads the choice
transformers made (the ``implementation`` its wrapper closed over, found through whatever layers
transformers and the ``kernels`` package put around the wrapper), not just what can be imported.

The backward check exists because the Triton backward of the gated delta rule has had silent
errors on some GPUs: wrong ``dbeta``/``dg`` on Hopper with Triton 3.4 to 3.7.0
(fla-org/flash-linear-attention#640; fla 0.6.0 refuses that combination) and NaN gradients on
Blackwell (#913). ``check_delta_rule`` compares every output and input gradient on Qwen3.5-0.8B's
layer shapes; ``benchmarks/check_delta_rule.py`` prints it, and a test runs it where a GPU is.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import math
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# import name → (distribution to install, transformers' Qwen3.5 functions it replaces in training)
PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fla": ("flash-linear-attention", ("torch_chunk_gated_delta_rule",)),
    "causal_conv1d": ("causal-conv1d", ("causal_conv1d_fn",)),
}
# Versions pinned for the optional extra; not yet verified on a GPU by this project.
PINNED = {"flash-linear-attention": "0.6.0", "causal-conv1d": "1.7.0", "triton": ">=3.7.1"}
SLOWDOWN = ("not measured in this project yet; upstream, a Qwen3.5-9B fine-tuning step took 1.22 s on the PyTorch "
            "fallback and 0.70 s with flash-linear-attention (1.7x, 8xB200, huggingface/transformers#48718)")

_checked_cuda = False


class SlowKernelWarning(UserWarning):
    """Qwen3.5 runs on CUDA on transformers' PyTorch reference kernels."""


@dataclass(frozen=True)
class PackageStatus:
    """One fast-kernel package: installed version, whether it imports, and whether transformers'
    Qwen3.5 code calls it (None: the wrapper could not be read, e.g. another transformers version)."""

    module: str
    distribution: str
    version: str | None
    importable: bool
    error: str
    used: bool | None

    def describe(self) -> str:
        if self.used:
            return f"{self.distribution} {self.version}: used"
        if self.version is None:
            return f"{self.distribution}: not installed"
        if not self.importable:
            return f"{self.distribution} {self.version}: installed but does not import ({self.error})"
        return f"{self.distribution} {self.version}: imports, but transformers' Qwen3.5 code does not call it"


@dataclass(frozen=True)
class KernelStatus:
    packages: dict[str, PackageStatus]

    @property
    def fast(self) -> bool:
        """Both kernels are what transformers' Qwen3.5 training forward calls."""
        return all(p.used for p in self.packages.values())

    def missing(self) -> list[PackageStatus]:
        return [p for p in self.packages.values() if not p.used]

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.packages.values())


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# How many layers (decorators, modules, closures) to look through for transformers' fallback wrapper:
# transformers 5.25 adds one (kernels' ``Func`` module over the wrapper); the bound keeps an unknown
# layout from turning the search into a walk over everything a closure can reach.
_SEARCH_DEPTH = 6


def _callable_attributes(obj: Any) -> list[Any]:
    """Callables an object stores on itself (``self.func = func``; kernels' ``kernelize`` rebinding
    ``forward`` on the instance)."""
    try:
        values = list(vars(obj).values())
    except TypeError:  # no __dict__ (slots, C types)
        return []
    return [v for v in values if callable(v) and not inspect.isclass(v)]


def _layers_below(layer: Any) -> list[Any]:
    """The callables ``layer`` may hand a call to: its ``__wrapped__``, a bound method's function and
    object, a partial's function, a function's closure, or a callable object's attributes and its
    class's ``forward``/``__call__``."""
    found: list[Any] = []
    # getattr_static: an nn.Module's __getattr__ or a mock must not run, nor invent attributes.
    wrapped = inspect.getattr_static(layer, "__wrapped__", None)
    if callable(wrapped):
        found.append(wrapped)
    if isinstance(layer, types.MethodType):
        found += [layer.__func__, *_callable_attributes(layer.__self__)]
    elif isinstance(layer, functools.partial):
        found.append(layer.func)
    elif isinstance(layer, types.FunctionType):
        for cell in layer.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell whose variable is not assigned yet
                continue
            if callable(contents) and not inspect.isclass(contents):
                found.append(contents)
    elif callable(layer) and not inspect.isclass(layer) and not isinstance(layer, types.BuiltinFunctionType):
        found += _callable_attributes(layer)
        for name in ("forward", "__call__"):
            method = inspect.getattr_static(type(layer), name, None)
            # nn.Module's own __call__ only dispatches to forward, which is already on the list.
            if isinstance(method, types.FunctionType) and method.__module__ != torch.nn.Module.__module__:
                found.append(method)
    return found


def _fallback_wrapper(function: Callable[..., Any]) -> types.FunctionType | None:
    """The transformers ``use_kernel_func_from_hub_with_fallback`` wrapper under ``function``: the
    nearest layer that is a function closing over ``implementation`` (its dispatch target).

    transformers 5.24 returns that wrapper itself; 5.25 passes it through kernels'
    ``use_kernel_forward_from_hub``, which turns a function into an instance of an nn.Module whose
    ``forward`` closes over it. Breadth-first, so the layer nearest to ``function`` wins."""
    frontier, seen = [function], set()
    for _ in range(_SEARCH_DEPTH + 1):
        below: list[Any] = []
        for layer in frontier:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, types.FunctionType) and "implementation" in layer.__code__.co_freevars:
                return layer
            below.extend(_layers_below(layer))
        frontier = below
    return None


def _closure_variable(function: types.FunctionType, name: str) -> Any:
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=True))
    return cells[name].cell_contents


def resolved_implementation(function: Callable[..., Any]) -> Callable[..., Any] | None:
    """The function a transformers ``use_kernel_func_from_hub_with_fallback`` wrapper dispatches to
    (the package's kernel or the PyTorch reference), read from the wrapper's closure through any
    layers around it; None when no layer of ``function`` is such a wrapper."""
    wrapper = _fallback_wrapper(function)
    return None if wrapper is None else _closure_variable(wrapper, "implementation")


def reference_implementation(function: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' PyTorch reference behind ``function``: what its fallback wrapper calls when the
    package is missing or the inputs are on a device the package does not run on. A plain function
    that is not wrapped at all is its own reference."""
    wrapper = _fallback_wrapper(function)
    if wrapper is not None:
        if "torch_function" in wrapper.__code__.co_freevars:
            return _closure_variable(wrapper, "torch_function")
        return inspect.unwrap(wrapper)  # the wrapper is functools.wraps(torch_function)
    if isinstance(function, types.FunctionType):
        return inspect.unwrap(function)
    raise LookupError(f"no PyTorch reference found behind {function!r}: not a transformers fallback wrapper "
                      f"within {_SEARCH_DEPTH} layers, nor a plain function")


def _uses(module: str, functions: tuple[str, ...]) -> bool | None:
    from transformers.models.qwen3_5 import modeling_qwen3_5

    found = [resolved_implementation(getattr(modeling_qwen3_5, name)) for name in functions]
    if any(f is None for f in found):
        return None
    return all((getattr(f, "__module__", "") or "").split(".")[0] == module for f in found)


def fast_kernels_status() -> KernelStatus:
    """What is installed and what transformers' Qwen3.5 code will call (see the module docstring)."""
    packages = {}
    for module, (distribution, functions) in PACKAGES.items():
        version, error = _version(distribution), ""
        try:
            importlib.import_module(module)
            importable = True
        except Exception as exc:  # a broken install raises anything (missing Triton, CUDA symbols)
            importable, error = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
        used = _uses(module, functions)
        if used is None:  # the wrapper is not readable: importability is the best guess left
            used = importable or None
        packages[module] = PackageStatus(module, distribution, version, importable, error, used)
    return KernelStatus(packages)


def has_linear_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` contains Qwen3.5 Gated DeltaNet layers (the ones the kernels speed up)."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    return any(isinstance(m, Qwen3_5GatedDeltaNet) for m in model.modules())


def slow_kernel_message(status: KernelStatus) -> str:
    names = " and ".join(p.distribution for p in status.missing())
    install = " ".join(f"'{p.distribution}=={PINNED[p.distribution]}'" for p in status.missing())
    return (f"Qwen3.5 is running on CUDA without {names} ({status.describe()}): transformers falls back to its "
            f"PyTorch reference kernels for the gated delta rule and the causal convolution. Slowdown: {SLOWDOWN}. "
            f"Install with pip install {install} (on Hopper GPUs also 'triton{PINNED['triton']}', "
            "fla-org/flash-linear-attention#640), then run benchmarks/check_delta_rule.py.")


def warn_if_slow(device: torch.device | str, model: torch.nn.Module | None = None) -> bool:
    """Warn (``SlowKernelWarning``) once per process when a CUDA run of a model with linear attention
    lacks the fast kernels; True when it warned. CPU runs never warn: the kernels are GPU-only."""
    global _checked_cuda
    if torch.device(device).type != "cuda" or _checked_cuda:
        return False
    if model is not None and not has_linear_attention(model):
        return False
    _checked_cuda = True
    status = fast_kernels_status()
    if status.fast:
        return False
    warnings.warn(slow_kernel_message(status), SlowKernelWarning, stacklevel=2)
    return True


# -- the delta-rule check --------------------------------------------------------------------------

@dataclass(frozen=True)
class DeltaRuleShape:
    """One linear-attention layer's call: batch, tokens, key/value heads and head dims."""

    batch: int
    tokens: int
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int

    @classmethod
    def of(cls, text_config: Any, batch: int, tokens: int) -> DeltaRuleShape:
        c = text_config
        return cls(batch, tokens, c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                   c.linear_value_head_dim)


# Relative error ‖fast − reference‖ / ‖reference‖ allowed per tensor (the metric of fla's own tests),
# by input dtype. bf16 inputs are compared against the fp32 reference on the same (rounded) values,
# so the bound covers bf16 arithmetic inside the kernel; these are priors to tighten from the
# errors the first GPU runs print.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 5e-3}
CHECKED = ("output", "dq", "dk", "dv", "dg", "dbeta")


def delta_rule_inputs(shape: DeltaRuleShape, dtype: torch.dtype, device: torch.device | str,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs distributed as Qwen3_5GatedDeltaNet makes them: q, k, v after the SiLU convolution,
    ``beta = sigmoid(b)``, ``g = -exp(A_log)·softplus(a + dt_bias)`` with A in (0.01, 16)."""
    gen = torch.Generator().manual_seed(seed)
    b, t = shape.batch, shape.tokens

    def draw(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)

    silu = torch.nn.functional.silu
    a_log = torch.empty(shape.value_heads).uniform_(0.01, 16, generator=gen).log()
    g = -a_log.exp() * torch.nn.functional.softplus(draw(b, t, shape.value_heads) + 1.0)
    cpu = {"q": silu(draw(b, t, shape.key_heads, shape.key_dim)), "k": silu(draw(b, t, shape.key_heads, shape.key_dim)),
           "v": silu(draw(b, t, shape.value_heads, shape.value_dim)), "g": g,
           "beta": draw(b, t, shape.value_heads).sigmoid(), "do": draw(b, t, shape.value_heads, shape.value_dim)}
    # g stays fp32, as the layer computes it; the rest take the layer's dtype.
    return {k: v.to(device, torch.float32 if k == "g" else dtype) for k, v in cpu.items()}


def _run(fn: Callable[..., Any], inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    leaves = {k: inputs[k].detach().to(dtype if k != "g" else torch.float32).requires_grad_() for k in
              ("q", "k", "v", "g", "beta")}
    out, _ = fn(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"], beta=leaves["beta"], initial_state=None,
                output_final_state=False, use_qk_l2norm_in_kernel=True)
    grads = torch.autograd.grad(out, list(leaves.values()), inputs["do"].to(out.dtype))
    return {"output": out, **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}}


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference.detach().double()
    diff = float((fast.detach().double() - ref).norm())
    base = float(ref.norm())
    return diff / base if base > 0 else (0.0 if diff == 0 else math.inf)


def check_delta_rule(shape: DeltaRuleShape, dtype: torch.dtype, device: torch.device | str = "cuda",
                     fast: Callable[..., Any] | None = None, seed: int = 0) -> dict[str, float]:
    """Relative error of ``fast`` (default: fla's ``chunk_gated_delta_rule``, called as transformers
    calls it) against transformers' PyTorch reference in fp32, for the output and the gradients of
    q, k, v, g and beta under one random upstream gradient. The fast kernel gets ``dtype`` inputs;
    the reference the same values in fp32."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    if fast is None:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fast
    reference = reference_implementation(modeling_qwen3_5.torch_chunk_gated_delta_rule)
    inputs = delta_rule_inputs(shape, dtype, device, seed)
    got = _run(fast, inputs, dtype)
    want = _run(reference, inputs, torch.float32)
    return {name: relative_error(got[name], want[name]) for name in CHECKED}
