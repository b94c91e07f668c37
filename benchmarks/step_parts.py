"""Measuring pieces of a Lightning training run, shared by ``train_throughput.py``.

``StepMeter`` (a callback) times every step from the end of the previous one (so the data and the
host-to-device copy are in it), then resets the peak memory after the warm-up; ``PartTimer`` (a
callback) says where a step's time goes, by module kind, forward and backward; ``step_flops``
counts the FLOPs of one training step with ``torch.utils.flop_counter``.

How ``PartTimer`` attributes time: forward, each tracked module's own wall time (pre- and
post-forward hooks); backward, the autograd engine runs one node at a time, so a hook on each
tracked module's output marks when its backward starts, and the time until the next such mark is
that module's. Gaps between tracked modules go to the one before (a decoder MLP's backward also
carries its layer norm's). On a GPU every hook synchronises, so the parts add up to wall time but
the step is slower than an unhooked one: the shares are what to read, not the absolute times.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_reset() -> None:
    """Linux: restart the process's peak resident memory (VmHWM) from the current use."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) * 1024 if found else 0


class StepMeter(L.Callback):
    """Wall time of each training step after ``warmup`` steps (data loading included), their
    triplets, and the peak memory over those steps (CUDA: allocated by torch; CPU: process RSS)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seen = 0
        self.times: list[float] = []
        self.triplets = 0
        self.peak_bytes = 0
        self._last = 0.0
        self.on_measure_start: Callable[[], None] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sync(pl_module.device)
        now = time.perf_counter()
        self.seen += 1
        if self.seen > self.warmup:
            self.times.append(now - self._last)
            self.triplets += len(batch["text"])
        elif self.seen == self.warmup:
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            else:
                peak_rss_reset()
            if self.on_measure_start is not None:
                self.on_measure_start()
        self._last = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cuda = pl_module.device.type == "cuda"
        self.peak_bytes = torch.cuda.max_memory_allocated(pl_module.device) if cuda else peak_rss_bytes()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


class PartTimer(L.Callback):
    """Forward and backward seconds per part (see the module docstring), plus ``data`` (from the end
    of a step to the start of the next), ``optimizer`` (the update after backward) and ``other``
    (the rest of the step: embeddings, norms outside tracked modules, building the dialogues...).

    Args:
        parts: name → function from the LightningModule to the modules of that part.
        warmup: steps left out of the sums.
    """

    def __init__(self, parts: dict[str, Callable[[L.LightningModule], list[nn.Module]]], warmup: int) -> None:
        self.part_fns = parts
        self.warmup = warmup
        self.forward: dict[str, float] = defaultdict(float)
        self.backward: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._seen = 0
        self._events: list[tuple[float, str]] = []
        self._starts: dict[int, float] = {}
        self._marks: dict[str, float] = {}
        self._device = torch.device("cpu")

    def _measuring(self) -> bool:
        return self._seen >= self.warmup

    def _now(self) -> float:
        sync(self._device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = pl_module.device
        for part, modules_of in self.part_fns.items():
            for module in modules_of(pl_module):
                module.register_forward_pre_hook(self._pre)
                module.register_forward_hook(self._post(part))
        self._marks["end"] = self._now()

    def _pre(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self._starts[id(module)] = self._now()

    def _post(self, part: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            start = self._starts.pop(id(module), None)
            if start is None:
                return
            if self._measuring():
                self.forward[part] += self._now() - start
            for tensor in _tensors(output):
                if tensor.requires_grad:
                    tensor.register_hook(self._grad_arrived(part))
        return hook

    def _grad_arrived(self, part: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self._events.append((self._now(), part))
        return hook

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._marks["start"] = self._now()
        if self._measuring():
            self.totals["data"] += self._marks["start"] - self._marks["end"]

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._marks["backward"] = self._now()
        self._events = []

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        end = self._now()
        if self._measuring():
            marks = [(self._marks["backward"], "other"), *sorted(self._events), (end, "")]
            for (t0, part), (t1, _) in zip(marks[:-1], marks[1:], strict=True):
                self.backward[part] += t1 - t0
            self.totals["forward"] += self._marks["backward"] - self._marks["start"]
            self.totals["backward"] += end - self._marks["backward"]
        self._marks["after_backward"] = end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._marks["end"] = self._now()
        if self._measuring():
            self.totals["optimizer"] += self._marks["end"] - self._marks["after_backward"]
            self.totals["step"] += self._marks["end"] - self._marks["start"]
            self.steps += 1
        self._seen += 1

    def table(self) -> str:
        """Markdown: per part, forward and backward ms per step and the share of the step (data included)."""
        n = max(self.steps, 1)
        step = (self.totals["step"] + self.totals["data"]) / n
        fwd_other = self.totals["forward"] - sum(self.forward.values())
        rows = [(part, self.forward[part], self.backward.get(part, 0.0)) for part in self.part_fns]
        rows += [("other (embeddings, dialogues, untracked ops)", fwd_other, self.backward.get("other", 0.0)),
                 ("optimizer step", 0.0, self.totals["optimizer"]), ("data + host-to-device", self.totals["data"], 0.0)]
        lines = ["| part | forward (ms) | backward (ms) | total (ms) | share of step |", "|---|---:|---:|---:|---:|"]
        for name, fwd, bwd in rows:
            total = (fwd + bwd) / n
            lines.append(f"| {name} | {1e3 * fwd / n:.1f} | {1e3 * bwd / n:.1f} | {1e3 * total:.1f} | "
                         f"{100 * total / step:.0f}% |")
        lines.append(f"| **step** | {1e3 * self.totals['forward'] / n:.1f} | {1e3 * self.totals['backward'] / n:.1f} "
                     f"| {1e3 * step:.1f} | 100% |")
        return "\n".join(lines)


def step_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of ``step()`` (a forward returning the loss) and its backward, as counted by torch's
    FlopCounterMode: matmuls, convolutions and attention; custom kernels (fla, Liger, Triton) and
    triangular solves are not seen."""
    with FlopCounterMode(display=False) as counter:
        step().backward()
    return int(counter.get_total_flops())
