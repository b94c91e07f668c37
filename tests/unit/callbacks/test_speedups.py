"""The Speedups callback: torch.compile changes nothing but speed, graph breaks are counted and
named, and Liger asked for where it cannot run stops the run with the reasons."""

from __future__ import annotations

import copy
import sys
import types
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from callbacks import Speedups
from callbacks.speedups import apply_liger, repeated_blocks


def fit_one_step(model: L.LightningModule, batch: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    return trainer


@pytest.fixture(scope="module")
def clip4cir() -> tuple[L.LightningModule, dict[str, Any]]:
    from lightning_modules import CLIP4CIR
    from lightning_modules.backbones import CLIPBackbone

    torch.manual_seed(0)
    model = CLIP4CIR(CLIPBackbone("tiny"))
    views = torch.rand(4, 2, 3, 64, 64)
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    batch = {"source_images": views, "source_mask": mask, "target_images": views.flip(0), "target_mask": mask.flip(0),
             "text": ["make it red", "add a pocket", "shorter sleeves", "a striped pattern"]}
    return model, batch


@pytest.mark.slow
def test_compiled_blocks_train_exactly_like_eager(clip4cir: tuple[L.LightningModule, dict[str, Any]]) -> None:
    """aot_eager traces forward and backward into graphs without generating code: loss and the
    updated weights must match the eager step, and every CLIP encoder layer must be compiled."""
    model, batch = clip4cir
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    fit_one_step(eager, batch, [])
    speedups = Speedups(compile=True, backend="eager")
    fit_one_step(compiled, batch, [speedups])

    layers = len(compiled.backbone.model.text_model.encoder.layers)
    assert len(speedups.compiled) == 2 * layers  # the text and the vision encoder's layers
    # One text forward (the query's text) and two image forwards (source and target views).
    assert speedups.report.calls == layers + 2 * layers
    assert speedups.report.graphs >= 1 and speedups.report.graph_breaks == 0
    assert compiled.last_terms["loss"] == pytest.approx(eager.last_terms["loss"], abs=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints keep their keys


class Chatty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        print("a print inside a compiled block breaks the graph here")
        return self.linear(y)


class Blocky(L.LightningModule):
    """One forced graph break in each of its two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.layers = nn.ModuleList([Chatty(), Chatty()])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch["x"]
        for layer in self.backbone.layers:
            x = layer(x)
        return x.square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_graph_breaks_are_counted_logged_and_named() -> None:
    torch.manual_seed(0)
    speedups = Speedups(compile=True, backend="eager")
    with pytest.warns(UserWarning, match=r"2 graph break\(s\).*print"):
        trainer = fit_one_step(Blocky(), {"x": torch.randn(3, 4)}, [speedups])
    # Each block is traced on its first call and breaks once at its print.
    assert speedups.report.graph_breaks == 2
    assert trainer.callback_metrics["speedups/graph_breaks"] == 2.0
    assert any("print" in reason for reason in speedups.report.reasons)


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Chatty()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).relu()


def test_eager_modules_run_untraced_inside_compiled_blocks() -> None:
    """Chatty kept eager: Dynamo never traces its print; the break it reports is the disabled call."""
    module = Blocky()
    module.backbone.layers = nn.ModuleList([Wrapped(), Wrapped()])
    speedups = Speedups(compile=True, backend="eager", eager_modules=["Chatty"])
    with pytest.warns(UserWarning, match="graph break"):
        fit_one_step(module, {"x": torch.randn(3, 4)}, [speedups])
    assert speedups.report.calls == 2 and speedups.report.graph_breaks >= 1
    assert not any("print" in reason for reason in speedups.report.reasons), speedups.report.reasons


def test_a_compiled_forward_nobody_calls_is_reported() -> None:
    speedups = Speedups(compile="backbone", backend="eager")
    with pytest.warns(UserWarning, match="compiled code was never called"):
        fit_one_step(Blocky(), {"x": torch.randn(3, 4)}, [speedups])
    assert speedups.report.calls == 0


def test_repeated_blocks_takes_the_outermost_lists_only() -> None:
    inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    outer = nn.ModuleList([nn.Sequential(inner), nn.Linear(2, 2)])
    root = nn.Module()
    root.blocks, root.single, root.head = outer, nn.ModuleList([nn.ReLU()]), nn.Linear(2, 2)
    assert repeated_blocks(root) == [outer[0], outer[1]]


def test_liger_where_it_cannot_run_is_an_error_with_every_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed, whatever this machine has
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"liger=true.*CUDA GPU.*this run is on cpu.*pip install 'liger-kernel"):
        apply_liger(model, torch.device("cpu"))


def test_liger_applies_the_model_types_function_with_the_three_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def apply_to_qwen3_5(rope: bool = False, cross_entropy: bool = False, fused_linear_cross_entropy: bool = True,
                         rms_norm: bool = True, swiglu: bool = True, model: nn.Module | None = None) -> None:
        calls.append({"model": model, "rope": rope, "cross_entropy": cross_entropy, "rms_norm": rms_norm,
                      "swiglu": swiglu, "flce": fused_linear_cross_entropy})

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"qwen3_5": apply_to_qwen3_5}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    qwen, clip = nn.Linear(2, 2), nn.Linear(2, 2)
    qwen.config, clip.config = types.SimpleNamespace(model_type="qwen3_5"), types.SimpleNamespace(model_type="clip")

    assert apply_liger(qwen, torch.device("cuda")) == "qwen3_5"
    assert calls == [{"model": qwen, "rope": False, "cross_entropy": False, "rms_norm": True, "swiglu": True,
                      "flce": True}]
    with pytest.raises(ValueError, match="no kernels for model type 'clip'"):
        apply_liger(clip, torch.device("cuda"))


def test_contradictory_switches_are_reported_together() -> None:
    with pytest.raises(ValueError, match=r"compile_mode='max-autotune' is an inductor option.*fullgraph=true without"):
        Speedups(compile=False, compile_mode="max-autotune", backend="eager", fullgraph=True)
