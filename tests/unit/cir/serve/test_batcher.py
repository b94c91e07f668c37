from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from cir.serve.batcher import MicroBatcher, QueueFull


class Recorder:
    """Doubles each item and records the batches; the first batch waits until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(10)
        return [ValueError(f"bad {i}") if i < 0 else 2 * i for i in items]


def busy(max_batch: int, max_wait_s: float, **options: float) -> tuple[Recorder, MicroBatcher, object]:
    """A batcher whose worker is inside ``run([first])`` until ``run.release`` is set: what is
    submitted meanwhile queues up behind it."""
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=max_batch, max_wait_s=max_wait_s, **options)
    first = batcher.submit(0)
    assert run.started.wait(5)
    return run, batcher, first


def test_requests_waiting_behind_a_busy_model_are_run_together_up_to_max_batch() -> None:
    run, batcher, first = busy(max_batch=4, max_wait_s=0.5)  # the next 8 queue up behind run([0])
    rest = [batcher.submit(i) for i in range(1, 9)]
    run.release.set()
    assert [f.result(5) for f in [first, *rest]] == [2 * i for i in range(9)]
    assert run.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert batcher.stats()["batches"] == 3 and batcher.stats()["largest_batch"] == 4
    batcher.close()


def test_max_batch_one_runs_every_request_alone() -> None:
    run = Recorder()
    run.release.set()
    batcher = MicroBatcher(run, max_batch=1, max_wait_s=0.5)
    futures = [batcher.submit(i) for i in range(5)]
    assert [f.result(5) for f in futures] == [0, 2, 4, 6, 8] and run.batches == [[i] for i in range(5)]
    batcher.close()


def test_a_lone_request_waits_at_most_max_wait() -> None:
    run = Recorder()
    run.release.set()
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.05)
    t0 = time.monotonic()
    assert batcher.submit(3).result(5) == 6
    assert time.monotonic() - t0 < 1.0  # 50 ms of waiting for company, not the 8 it could hold
    batcher.close()


def test_errors_reach_only_their_own_requests_and_a_failing_batch_fails_all_of_it() -> None:
    run, batcher, first = busy(max_batch=4, max_wait_s=0.5)
    good, bad = batcher.submit(2), batcher.submit(-1)
    run.release.set()
    assert first.result(5) == 0 and good.result(5) == 4
    with pytest.raises(ValueError, match="bad -1"):
        bad.result(5)

    def broken(items: Sequence[int]) -> list[int]:
        raise RuntimeError("model fault")

    failing = MicroBatcher(broken, max_batch=2, max_wait_s=0.01)
    for f in [failing.submit(1), failing.submit(2)]:
        with pytest.raises(RuntimeError, match="model fault"):
            f.result(5)
    assert failing.submit(3).exception(5) is not None  # the worker lives on after a failure
    batcher.close()
    failing.close()


def test_a_full_queue_refuses_at_once_and_a_timed_out_client_gets_timeout_error() -> None:
    run, batcher, _ = busy(max_batch=1, max_wait_s=0.0, max_queue=2)
    batcher.submit(1), batcher.submit(2)
    with pytest.raises(QueueFull, match="2 requests already waiting"):
        batcher.submit(3)

    async def client() -> int:
        return await batcher(4, timeout_s=0.05)

    with pytest.raises(QueueFull):
        asyncio.run(client())
    run.release.set()
    time.sleep(0.2)

    slow = Recorder()  # never released within the client's patience
    waiting = MicroBatcher(slow, max_batch=1, max_wait_s=0.0)

    async def impatient() -> int:
        return await waiting(5, timeout_s=0.05)

    with pytest.raises(TimeoutError):
        asyncio.run(impatient())
    slow.release.set()
    batcher.close()
    waiting.close()


def test_close_serves_what_was_queued_and_refuses_what_comes_after() -> None:
    run, batcher, first = busy(max_batch=2, max_wait_s=0.01)
    queued = [batcher.submit(1), batcher.submit(2)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.1)
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit(3)
    run.release.set()
    closer.join(10)
    assert not closer.is_alive() and [f.result(5) for f in [first, *queued]] == [0, 2, 4]
