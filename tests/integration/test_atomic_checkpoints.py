"""A job killed while it writes a checkpoint leaves the previous checkpoint whole, and resumes.

A child process trains a tiny CLIP4CIR with a checkpoint every step through ``AtomicCheckpointIO``;
its ``torch.save`` is made to write half a file and SIGKILL the process during the third save. The
parent then finds ``last.ckpt`` exactly as the second save left it, and resumes from it to the end.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import ShardDataModule
from datamodules.atomic import TEMP_MARK
from lightning_modules import CLIP4CIR
from lightning_modules.backbones import CLIPBackbone
from lightning_modules.core import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_atomic_checkpoints import fit

    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third checkpoint: half written, then the process is killed
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    fit({data!r}, {root_dir!r}, steps=6)
""")


def fit(data: str, root_dir: str, steps: int, ckpt_path: str | None = None) -> L.Trainer:
    torch.manual_seed(0)
    model = CLIP4CIR(CLIPBackbone("tiny"))
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root_dir, plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=f"{root_dir}/checkpoints", every_n_train_steps=1,
                                                   save_top_k=1, save_last=True, filename="step{step}")])
    trainer.fit(model, datamodule=ShardDataModule(data, batch_size=4, num_workers=0), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
def test_a_kill_inside_a_save_keeps_the_previous_checkpoint(small_data: Path, tmp_path: Path) -> None:
    child = CHILD.format(root=str(ROOT), tests=str(Path(__file__).parent), data=str(small_data),
                         root_dir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed, as planned, inside the third save
    ckpts = tmp_path / "checkpoints"
    # Saves go step file then last.ckpt: the third save is step 2's file, so last.ckpt is step 1's.
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 1
    assert [p.name for p in ckpts.iterdir() if TEMP_MARK in p.name]  # the killed write stayed aside
    trainer = fit(str(small_data), str(tmp_path), steps=6, ckpt_path=str(ckpts / "last.ckpt"))
    assert trainer.global_step == 6
    assert not [p.name for p in ckpts.iterdir() if TEMP_MARK in p.name]  # cleaned by the next save
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6
