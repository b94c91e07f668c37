"""The training stream resumes exactly: a loader told that k batches of an epoch were consumed
yields the batches an uninterrupted loader yields from batch k on, then the same next epoch;
with DataLoader workers (k not a multiple of their count), with and without cost bucketing."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import ShardDataModule
from datamodules.resumable import worker_position


def _keys(batch: dict) -> list[tuple]:
    return [(m["triplet"]["source_id"], m["triplet"]["target_id"], t) for m, t in zip(batch["meta"], batch["text"],
                                                                                        strict=True)]


def _epochs(dm: ShardDataModule, n: int, resume: dict | None = None) -> list[list[list[tuple]]]:
    loader = dm.train_dataloader()
    if resume:
        loader.load_state_dict(resume)
    out = []
    for epoch in range(resume["epoch"] if resume else 0, n):
        loader.progress = lambda e=epoch: (e, 0, 1.0)
        out.append([_keys(b) for b in loader])
    return out


def test_worker_roles_continue_the_round_robin() -> None:
    # Brute force: which worker delivered batch i, and how many each had delivered before batch k.
    for workers in (1, 2, 3):
        for k in range(10):
            owner = [i % workers for i in range(20)]
            for w in range(workers):
                role, done = worker_position(k, w, workers)
                # The resumed loader's batch w comes from `role`, and it is the role's batch number `done`.
                assert owner[k + w] == role and done == sum(1 for i in range(k + w) if owner[i] == role)


@pytest.mark.parametrize("sampling", ["permutation", "resampled"])
@pytest.mark.parametrize("bucket_batches", [0, 3])
def test_a_resumed_stream_yields_the_rest_of_the_epoch_then_the_next(small_data: Path, bucket_batches: int,
                                                                     sampling: str) -> None:
    def dm() -> ShardDataModule:
        return ShardDataModule(str(small_data), batch_size=4, num_workers=2, bucket_batches=bucket_batches,
                               train_text="mixed", sampling=sampling)  # type: ignore[arg-type]

    reference = _epochs(dm(), 2)
    n = len(reference[0])
    assert n >= 6 and reference[0] != reference[1]
    for k in (1, n // 2 + 1, n - 1):  # odd counts: the resumed workers take shifted roles
        resumed = _epochs(dm(), 2, {"epoch": 0, "batches": k})
        assert resumed[0] == reference[0][k:], k
        assert resumed[1] == reference[1], k
    assert _epochs(dm(), 2, {"epoch": 1, "batches": 2})[0] == reference[1][2:]
    # Saved at the very end of epoch 0: Lightning iterates for epoch 1 while its epoch still says 0.
    loader = dm().train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches": n})
    loader.progress = lambda: (0, 0, 1.0)  # (epoch, processed, limit_train_batches)
    assert [_keys(b) for b in loader] == reference[1]
    # limit_train_batches=k ends every epoch after k batches: saved there, the run goes on with the next
    # epoch, although the loader could yield more (and the Trainer has not yet counted its batches).
    # Read from a real Trainer, as a resumed fit does: its num_training_batches is still infinite then.
    for limit in (n // 2, 0.5):
        cut = n // 2 if isinstance(limit, int) else int(len(dm().train_dataloader()) * limit)
        module = dm()
        module.trainer = L.Trainer(limit_train_batches=limit, logger=False, enable_checkpointing=False)
        assert module.trainer.num_training_batches == float("inf")
        loader = module.train_dataloader()
        loader.load_state_dict({"epoch": 0, "batches": cut})
        assert [_keys(b) for b in loader] == reference[1], limit
    # Lightning may start iterating an epoch twice (setting up, then restarting its fetcher).
    loader = dm().train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches": 3})
    loader.progress = lambda: (1, 0, 1.0)
    next(iter(loader))
    assert [_keys(b) for b in loader] == reference[1][3:]


def test_the_text_choice_does_not_depend_on_the_samples_before(small_data: Path) -> None:
    a = ShardDataModule(str(small_data), batch_size=4, num_workers=0, train_text="mixed").train_dataloader()
    first = next(iter(a))
    texts = {(m["triplet"]["source_id"], m["triplet"]["target_id"]): t for m, t in zip(first["meta"], first["text"],
                                                                                        strict=True)}
    b = ShardDataModule(str(small_data), batch_size=4, num_workers=0, train_text="mixed").train_dataloader()
    b.load_state_dict({"epoch": 0, "batches": 1})
    assert torch.is_tensor(next(iter(b))["source_images"])
    assert len(set(texts.values())) >= 1
