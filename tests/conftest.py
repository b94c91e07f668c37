from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests must never reach a hub, whatever the machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# `make test` runs two pytest-xdist workers on a two-core machine. Two OpenMP threads per worker
# (torch's default there) would oversubscribe the cores, and spinning OpenMP threads then make small
# operations up to 10x slower; one thread per worker (and per process a test starts) avoids that.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated shard folder shared by the tests that only read it."""
    from datamodules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, products=120, seed=3, val_fraction=0.25, maxcount=40)
    return out


# What Lightning's DDP launcher writes into os.environ of the process that runs a Trainer (and never
# removes, except WORLD_SIZE). Left behind by an in-process run, LOCAL_RANK tells every later
# `lightning fit --trainer.strategy=ddp` subprocess of this worker that an outside launcher started
# it: rank 0 then spawns no rank 1 and waits for it forever (and a stale MASTER_PORT may be taken).
DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_rank_environment() -> Iterator[None]:
    before = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's MLflow records out of the repository's mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # `lightning ... --debug` run in process sets CIR_DEBUG for good; no test may inherit it.
    monkeypatch.delenv("CIR_DEBUG", raising=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's cache of checkpoint digests stays untouched, in this process and the commands
    tests start (only ours: the Hugging Face and torch caches stay where they are)."""
    monkeypatch.setenv("CIR_CACHE_DIR", str(tmp_path / "cir-cache"))
