"""Speed switches applied to a model's backbone when the run is set up: ``torch.compile`` and Liger
kernels; plus the fast-kernel guard of Qwen3.5's linear attention (``backbones.kernels``).

``compile`` compiles the ``forward`` of the backbone's repeated blocks (every member of an
``nn.ModuleList``: decoder layers, vision blocks, CLIP encoder layers), which leaves parameter
names and so checkpoints unchanged; ``backbone`` compiles the backbone's own ``forward`` instead
(only ProCIR's contrastive stage calls it). A compile can quietly run eager: a graph break splits
a block into several graphs with Python in between, a frame Dynamo cannot handle or one past the
recompile limit (new sequence lengths) runs uncompiled, and a compiled ``forward`` nobody calls
does nothing. So the compiled calls and Dynamo's counters are read after the first training step
and at the end of every epoch: ``speedups/compiled_calls``, ``speedups/compiled_graphs``,
``speedups/graph_breaks`` and ``speedups/eager_frames`` are logged, and a warning names the
reasons. Dynamo's counters only move when it compiles: a second model compiled in the same
process reuses the first one's graphs and reports none.

``liger`` patches RMSNorm, SwiGLU and the fused linear cross-entropy (the SFT stage's LM loss over
Qwen3.5's 248K-token vocabulary, without materialising the logits) into the backbone through
``liger_kernel``'s function for the model type. Liger's kernels are Triton GPU kernels: on a CPU,
without the package, or for a model type Liger does not cover, the callback stops the run with an
error naming the switch, rather than a warning: a switch that silently does nothing makes the runs
compared against it lie, which is the failure this callback exists to expose. Set ``liger: false``
for CPU runs of a GPU configuration.
"""

from __future__ import annotations

import importlib
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_modules.backbones.kernels import warn_if_slow

CompileScope = Literal["layers", "backbone"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
LIGER_PIN = "liger-kernel==0.8.5"
KEY = "trainer.callbacks (Speedups)"


@runtime_checkable
class HasBackbone(Protocol):
    """A model whose encoder is one ``nn.Module`` attribute, ``backbone`` (every CIR family)."""

    backbone: nn.Module


def repeated_blocks(root: nn.Module) -> list[nn.Module]:
    """Every member of every ``nn.ModuleList`` of two or more under ``root``, outermost lists only."""
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(prefix) for prefix in taken):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            blocks.extend(module)
            taken.append(f"{name}.")
    return blocks


def apply_liger(model: nn.Module, device: torch.device) -> str:
    """Liger's RMSNorm, SwiGLU and fused linear cross-entropy patched into ``model`` (a transformers
    model); returns the model type. Every reason it cannot is reported in one error."""
    problems = []
    if device.type != "cuda":
        problems.append(f"it needs a CUDA GPU (Liger's kernels are Triton GPU kernels); this run is on {device.type}")
    monkey_patch = None
    try:
        monkey_patch = importlib.import_module("liger_kernel.transformers.monkey_patch")
    except ImportError as exc:
        problems.append(f"the liger-kernel package does not import ({exc}); install it with pip install '{LIGER_PIN}'")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = getattr(monkey_patch, "MODEL_TYPE_TO_APPLY_LIGER_FN", {}).get(model_type) if monkey_patch else None
    if monkey_patch is not None and apply is None:
        problems.append(f"Liger has no kernels for model type {model_type!r} (it covers LLM decoders such as "
                        "qwen3_5, not CLIP or BLIP-2)")
    if problems:
        raise ValueError(f"{KEY}: liger=true cannot be applied: " + "; ".join(problems)
                         + ". Set liger: false (CPU runs, non-LLM backbones).")
    wanted = {"rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True, "cross_entropy": False,
              "rope": False}
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{k: v for k, v in wanted.items() if k in accepted})
    return str(model_type)


def _summary(reason: str) -> str:
    """A Dynamo reason in one line: its title and, when given, its explanation."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if not lines:
        return "(no reason given)"
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines if line.startswith("Explanation:")),
                       "")
    return f"{lines[0]} ({explanation[:200]})" if explanation else lines[0][:200]


def dynamo_counters() -> dict[str, Counter[str]]:
    from torch._dynamo.utils import counters

    return {kind: Counter(values) for kind, values in counters.items()}


@dataclass
class CompileReport:
    """What Dynamo did between two counter snapshots."""

    calls: int = 0
    graphs: int = 0
    graph_breaks: int = 0
    eager_frames: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @classmethod
    def between(cls, before: dict[str, Counter[str]], after: dict[str, Counter[str]], calls: int) -> CompileReport:
        def delta(kind: str) -> Counter[str]:
            return after.get(kind, Counter()) - before.get(kind, Counter())

        frames, breaks, failed = delta("frames"), delta("graph_break"), delta("unimplemented")
        reasons: Counter[str] = Counter()
        for reason, n in (breaks + failed).items():
            reasons[_summary(reason)] += n
        return cls(calls=calls, graphs=delta("stats")["unique_graphs"], graph_breaks=sum(breaks.values()),
                   eager_frames=max(frames["total"] - frames["ok"], 0), reasons=reasons)

    def metrics(self) -> dict[str, float]:
        return {"speedups/compiled_calls": float(self.calls), "speedups/compiled_graphs": float(self.graphs),
                "speedups/graph_breaks": float(self.graph_breaks), "speedups/eager_frames": float(self.eager_frames)}

    def problems(self) -> list[str]:
        out = []
        if self.calls == 0:
            out.append("the compiled code was never called: the model does not go through the compiled "
                       "forward (try compile: layers)")
        if self.graph_breaks:
            out.append(f"{self.graph_breaks} graph break(s): those blocks run as several graphs with Python between")
        if self.eager_frames:
            out.append(f"{self.eager_frames} frame(s) fell back to eager (Dynamo gave up or hit its recompile limit)")
        if out and self.reasons:
            top = "; ".join(f"{n}x {reason}" for reason, n in self.reasons.most_common(3))
            out.append(f"reasons: {top}")
        return out


class Speedups(Callback):
    """``torch.compile`` and Liger kernels for the backbone, and the fast-kernel guard.

    Args:
        compile: ``true``/``layers`` compiles every repeated block of the backbone; ``backbone``
            compiles the backbone's ``forward`` whole; ``false`` leaves it eager.
        compile_mode: the inductor mode (``max-autotune`` etc.); only with ``backend: inductor``.
        backend: the ``torch.compile`` backend (``eager``/``aot_eager`` trace without generating
            code: for tests and for finding graph breaks cheaply).
        fullgraph: refuse graph breaks (an error at the first one instead of a report).
        dynamic: ``torch.compile``'s ``dynamic`` (None: dynamic after the first shape change).
        eager_modules: class names of modules inside the compiled regions that stay eager (their
            ``forward`` behind ``torch.compiler.disable``; each call is a deliberate graph break),
            e.g. ``[Qwen3_5GatedDeltaNet]``: on torch 2.13 the compiled backward of a Qwen3.5
            linear-attention layer on transformers' PyTorch reference kernels fails ("view size is
            not compatible"; measured with aot_eager on the CPU).
        liger: Liger's RMSNorm, SwiGLU and fused linear cross-entropy (CUDA and liger-kernel only).
        report_after: training batches after which Dynamo's counters are first read (the warm-up).
    """

    def __init__(self, compile: bool | CompileScope = False, compile_mode: CompileMode = "default",
                 backend: str = "inductor", fullgraph: bool = False, dynamic: bool | None = None,
                 eager_modules: list[str] | None = None, liger: bool = False, report_after: int = 1) -> None:
        problems = []
        if compile not in (False, True, "layers", "backbone"):
            problems.append(f"compile={compile!r}: choose false, true, 'layers' or 'backbone'")
        if compile_mode != "default" and backend != "inductor":
            problems.append(f"compile_mode={compile_mode!r} is an inductor option; backend={backend!r} ignores it")
        if fullgraph and not compile:
            problems.append("fullgraph=true without compile: set compile: true")
        if eager_modules and fullgraph:
            problems.append("eager_modules break the graph on purpose: not with fullgraph=true")
        if report_after < 1:
            problems.append(f"report_after={report_after}: must be >= 1")
        if problems:
            raise ValueError(f"{KEY}: " + "; ".join(problems))
        self.scope: CompileScope | None = "layers" if compile is True else (compile or None)
        self.compile_mode = compile_mode
        self.backend = backend
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self.liger = liger
        self.report_after = report_after
        self.eager_modules = list(eager_modules or [])
        self.compiled: list[nn.Module] = []
        self.liger_model_type: str | None = None
        self.report = CompileReport()
        self.calls = 0
        self._baseline: dict[str, Counter[str]] = {}
        self._warned: Counter[str] = Counter()
        self._batches = 0

    def _backbone(self, pl_module: LightningModule) -> nn.Module:
        if not isinstance(pl_module, HasBackbone):
            raise TypeError(f"{KEY}: {type(pl_module).__name__} has no `backbone` module to speed up; remove the "
                            "callback from trainer.callbacks")
        return pl_module.backbone

    def compile_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"backend": self.backend, "fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if self.compile_mode != "default":
            kwargs["mode"] = self.compile_mode
        return kwargs

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        backbone = self._backbone(pl_module)
        warn_if_slow(trainer.strategy.root_device, backbone)
        if self.liger and self.liger_model_type is None:
            inner = backbone.model if isinstance(getattr(backbone, "model", None), nn.Module) else backbone
            self.liger_model_type = apply_liger(inner, trainer.strategy.root_device)
        if self.scope is None or self.compiled:
            return
        regions = repeated_blocks(backbone) if self.scope == "layers" else [backbone]
        if not regions:
            raise ValueError(f"{KEY}: compile=layers found no repeated blocks (nn.ModuleList) in "
                             f"{type(backbone).__name__}; use compile: backbone")
        for module in backbone.modules():
            if type(module).__name__ in self.eager_modules:
                module.forward = torch.compiler.disable(module.forward, recursive=True)
        for region in regions:
            self._compile(region)
        self.compiled = regions
        self._baseline = dynamo_counters()

    def _compile(self, region: nn.Module) -> None:
        """``region.forward`` compiled, behind a call counter: Dynamo's counters only move when
        it compiles, so they cannot tell a compiled forward nobody calls from one served by the
        cache (compiled earlier in the process)."""
        compiled = torch.compile(region.forward, **self.compile_kwargs())

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return compiled(*args, **kwargs)

        region.forward = forward

    def _check(self, pl_module: LightningModule) -> None:
        self.report = CompileReport.between(self._baseline, dynamo_counters(), self.calls)
        for name, value in self.report.metrics().items():
            pl_module.log(name, value, batch_size=1)
        new = [p for p in self.report.problems() if not self._warned[p]]
        if any(not p.startswith("reasons:") for p in new):
            self._warned.update(new)
            rank_zero_warn(f"torch.compile ({len(self.compiled)} region(s), backend {self.backend}): "
                           + "; ".join(self.report.problems()))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        if self.compiled and self._batches == self.report_after:
            self._check(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.compiled and self._batches >= self.report_after:
            self._check(pl_module)
