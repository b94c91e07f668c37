"""FSDP2 (``configs/trainer/fsdp.yaml``) and LoRA with Lightning on 2 CPU processes (gloo), and a LoRA
run's checkpoint through the commands.

One fork of 2 processes runs every distributed check: each rank trains tiny CLIP4CIR (full fine-tuning,
learnable temperature, gradient clipping) and tiny ProCIR with LoRA adapters (and, under FSDP,
activation checkpointing) for two SGD steps, once under DDP and once under ``FSDP2Strategy``, on its
half of one batch. The loss of the second step (the loss after one update) and every weight after the
steps must be the same under both strategies, and the LoRA adapters the same on both DDP ranks and
equal to one process holding the whole batch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image
from support.ports import free_port
from torch.utils.data import DataLoader

from lightning_modules import CLIP4CIR, Combiner, ProCIR, SymmetricInfoNCE
from lightning_modules.backbones import CLIPBackbone, QwenBackbone
from lightning_modules.core.adapters import LoraSettings, apply_lora
from lightning_modules.core.sharding import FSDP2Strategy

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"
N = 4  # one global batch, split over the ranks
LORA = LoraSettings(r=4, dropout=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tiny models run fastest on one thread: two threads per process on a busy 2-core machine
    made their steps 10-30× slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5)


def build(family: str) -> L.LightningModule:
    torch.manual_seed(0)
    if family == "clip4cir":
        return CLIP4CIR(CLIPBackbone("tiny"), Combiner(48, dropout=0.0), loss=SymmetricInfoNCE(temperature=0.1),
                        optimizer=sgd)
    model = ProCIR(QwenBackbone("tiny"), align_caption="short", image_text_eval=False, optimizer=sgd, lora=LORA)
    apply_lora(model, LORA)  # now rather than in setup, to draw the adapters below (setup's call is then a no-op)
    # B = 0 would give A no gradient in the first step: start from random B so both move.
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def batch(family: str, model: L.LightningModule, lo: int, hi: int) -> dict:
    texts = ["make it red", "add an open back", "long sleeves please", "switch to stripes"]
    gen = torch.Generator().manual_seed(1)
    if family == "clip4cir":
        out = {"source_images": torch.randn(N, 2, 3, 64, 64, generator=gen),
               "source_mask": torch.ones(N, 2, dtype=torch.bool),
               "target_images": torch.randn(N, 1, 3, 64, 64, generator=gen),
               "target_mask": torch.ones(N, 1, dtype=torch.bool), "text": texts}
    else:
        rng = random.Random(2)
        views = [model.backbone.image_transform(Image.new("RGB", (64, 96), tuple(rng.randrange(256) for _ in "rgb")))
                 for _ in range(2 * N)]
        captions = ["a red plain dress", "a blue striped shirt", "a green checked top", "a black printed skirt"]
        out = {"source_images": [[v] for v in views[:N]], "target_images": [[v] for v in views[N:]], "text": texts,
               "target_id": [f"t{i}" for i in range(N)],
               "meta": [{"source": {"short_caption": c}, "target": {"short_caption": captions[-1 - i]}}
                        for i, c in enumerate(captions)]}
    return {k: v[lo:hi] for k, v in out.items()}


def fit(family: str, strategy: Any, rank: int, world: int, folder: Path) -> dict[str, Any]:
    """Two SGD steps on this rank's half of the batch; the second step's loss, the weights after."""
    model = build(family)
    devices = {"devices": world, "strategy": strategy} if world > 1 else {"devices": 1}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, gradient_clip_val=1.0, default_root_dir=folder, **devices)
    half = N // world
    data = batch(family, model, rank * half, (rank + 1) * half)
    trainer.fit(model, train_dataloaders=DataLoader([data, data], batch_size=None, collate_fn=lambda b: b))
    path = folder / f"{family}-{type(strategy).__name__}-{world}.ckpt"
    trainer.save_checkpoint(path)  # FSDP2: the full state dict, gathered on rank 0
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    return {"loss": float(trainer.callback_metrics["train/loss"]), "path": path, "local_numel": local,
            "adapters": adapters, "units": sum(isinstance(m, FSDPModule) for m in model.modules())}


def both_strategies(rank: int, world: int, folder: Path) -> dict[str, dict[str, Any]]:
    # ProCIR's FSDP run also recomputes its layers' activations in backward (the same gradients).
    return {f"{family}/{kind}": fit(family, strategy, rank, world, folder)
            for family in ("clip4cir", "procir")
            for kind, strategy in (("ddp", "ddp"),
                                   ("fsdp", FSDP2Strategy(activation_checkpointing=family == "procir")))}


def _entry(rank: int, world: int, port: int, folder: Path, fn: Callable[..., Any]) -> None:
    # What an external launcher (torchrun) sets: Lightning then joins these processes instead of starting its own.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    torch.save(fn(rank, world, folder), folder / f"rank{rank}.pt")


def run_forked(fn: Callable[..., Any], world: int, folder: Path) -> list[Any]:
    """``fn(rank, world, folder)`` in ``world`` forked processes (forked: no re-import of torch and the
    models, seconds instead of half a minute), one thread each (two threads per process on two busy
    cores made a step of the tiny models 30× slower); each rank's result, rank order."""
    mp.start_processes(_entry, args=(world, free_port(), folder, fn), nprocs=world, start_method="fork")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    return run_forked(both_strategies, 2, tmp_path_factory.mktemp("fsdp"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip4cir", "procir"])
def test_fsdp_gives_the_loss_and_weights_of_ddp(family: str, two_ranks: list) -> None:
    for rank in two_ranks:
        assert rank[f"{family}/fsdp"]["loss"] == pytest.approx(rank[f"{family}/ddp"]["loss"], abs=1e-5)
    ddp, fsdp = weights(two_ranks[0][f"{family}/ddp"]["path"]), weights(two_ranks[0][f"{family}/fsdp"]["path"])
    assert fsdp.keys() == ddp.keys()
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in ddp) < 1e-5
    initial = build(family).state_dict()
    assert max(float((ddp[k] - initial[k]).abs().max()) for k in ddp) > 1e-3  # the steps did train
    # Sharded for real: each rank held about half of the weights, where DDP holds them all, in one unit
    # per transformer layer (tiny CLIP: 2 text + 2 vision layers; tiny Qwen3.5: 2 LM + 2 vision blocks)
    # and the root.
    whole = sum(v.numel() for v in initial.values() if v.is_floating_point())
    assert all(r[f"{family}/fsdp"]["local_numel"] < 0.6 * whole <= r[f"{family}/ddp"]["local_numel"]
               for r in two_ranks)
    assert [r[f"{family}/fsdp"]["units"] for r in two_ranks] == [4 + 1, 4 + 1]


@pytest.mark.slow
def test_lora_under_ddp_matches_one_process_with_the_whole_batch(two_ranks: list, tmp_path: Path) -> None:
    ranks = [r["procir/ddp"]["adapters"] for r in two_ranks]
    (single,) = run_forked(lambda rank, world, folder: fit("procir", None, rank, world, folder), 1, tmp_path)
    assert ranks[0].keys() == ranks[1].keys() == single["adapters"].keys() and ranks[0]
    for name, value in single["adapters"].items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], value, atol=1e-5), name
    # The mean of the ranks' losses is the loss of the whole batch.
    assert sum(r["procir/ddp"]["loss"] for r in two_ranks) / 2 == pytest.approx(single["loss"], abs=1e-5)
    # The LoRA run's checkpoint holds the adapters beside the frozen base weights, which did not move.
    saved, initial = weights(two_ranks[0]["procir/fsdp"]["path"]), build("procir").state_dict()
    assert any(".lora_A." in k for k in saved)
    frozen = [k for k in initial if ".lora_" not in k and k.startswith("backbone.")]
    assert frozen and all(torch.equal(saved[k], initial[k]) for k in frozen)


def test_the_fsdp_config_builds_the_strategy_it_documents() -> None:
    from importlib import import_module

    config = yaml.safe_load((ROOT / "configs/trainer/fsdp.yaml").read_text())
    assert config["defaults"] == ["gpu_bf16.yaml"]  # bf16-mixed autocast over the sharded float32 weights
    module, _, name = config["trainer"]["strategy"]["class_path"].rpartition(".")
    strategy = getattr(import_module(module), name)(**config["trainer"]["strategy"]["init_args"])
    assert isinstance(strategy, FSDP2Strategy) and strategy.param_dtype == "bfloat16"
    assert strategy._save_distributed_checkpoint is False  # one last.ckpt, loadable without FSDP


@pytest.mark.slow
def test_a_lora_checkpoint_loads_through_the_commands_and_exports_merged(small_data: Path, tmp_path: Path) -> None:
    from cir.__main__ import main
    from cir.models import encode_query, load_model_and_data, load_weights_into
    from lightning_modules.core.adapters import is_lora_model

    lora = ["--model.init_args.lora.r=4"]
    common = ["--trainer.logger=false", f"--data.init_args.data_dir={small_data}"]
    # The demo's model (tiny CLIP, Combiner of width 48) with trained adapters: not the zeros they start from.
    model = CLIP4CIR(CLIPBackbone("tiny"), Combiner(48), lora=LoraSettings(r=4))
    apply_lora(model, model.lora)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.1)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    image = tmp_path / "front.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)

    with pytest.raises(SystemExit, match=r"holds LoRA adapters but the experiment has no model\.init_args\.lora"):
        load_weights_into(CLIP4CIR(CLIPBackbone("tiny"), Combiner(48)), ckpt)

    # The export loads the LoRA checkpoint through load_model_and_data with the experiment's lora setting.
    merged = tmp_path / "merged.ckpt"
    main(["export", "--config", str(DEMO), "--ckpt", str(ckpt), "--out", str(merged), "--", *common, *lora])
    exported = torch.load(merged, map_location="cpu", weights_only=True)
    assert exported["epoch"] == 3 and not any(".lora_" in k or "base_layer" in k for k in exported["state_dict"])
    q_proj = "backbone.model.text_model.encoder.layers.0.self_attn.q_proj"  # the adapter is in the weight now
    base = model.state_dict()[f"{q_proj}.base_layer.weight"]
    assert (exported["state_dict"][f"{q_proj}.weight"] - base).abs().max() > 1e-3
    plain, dm = load_model_and_data([str(DEMO)], str(merged), common)  # no lora setting at all
    assert not is_lora_model(plain)
    expected = encode_query(model.eval(), dm, [str(image)], "make it blue")
    assert torch.allclose(encode_query(plain, dm, [str(image)], "make it blue"), expected, atol=1e-5)
