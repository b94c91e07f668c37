"""Requests batched on the model: a short queue that one worker thread drains.

The worker takes the first waiting request, then keeps collecting for at most ``max_wait_s`` or
until ``max_batch`` are in hand, and runs them as one batch; each request gets its own result or
its own exception. Under one client a request waits at most ``max_wait_s`` more than it would
alone; under many, one forward serves several of them. The queue is bounded: a full queue refuses
at once (the service answers 503) instead of letting waits grow without limit.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The service is at its queue limit; the client should retry later."""


class MicroBatcher(Generic[T, R]):
    """``run(items)`` returns one result (or an exception instance) per item, in order."""

    def __init__(self, run: Callable[[Sequence[T]], Sequence[R | BaseException]], max_batch: int = 8,
                 max_wait_s: float = 0.005, max_queue: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: at least 1 (1 turns batching off)")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self._queue: queue.Queue[tuple[T, Future[R]] | None] = queue.Queue(maxsize=max_queue)
        self.batches = self.items = 0
        self.largest = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        if self._closed:
            raise QueueFull("the service is shutting down")
        future: Future[R] = Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests already waiting") from None
        return future

    async def __call__(self, item: T, timeout_s: float) -> R:
        """Await one item's result from an event loop; ``TimeoutError`` after ``timeout_s``."""
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(item)), timeout_s)

    def close(self) -> None:
        """Serve what is queued, refuse what comes after, stop the worker."""
        self._closed = True
        try:
            self._queue.put(None, timeout=5)
        except queue.Full:  # the worker drains the queue after its batch, then sees the marker
            self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stats(self) -> dict[str, float]:
        return {"batches": self.batches, "requests": self.items, "largest_batch": self.largest,
                "mean_batch": self.items / self.batches if self.batches else 0.0, "waiting": self.waiting,
                "max_batch": self.max_batch, "max_wait_ms": 1000 * self.max_wait_s}

    def _collect(self, first: tuple[T, Future[R]]) -> tuple[list[tuple[T, Future[R]]], bool]:
        """The batch, and whether close() was called meanwhile (then this batch is the last)."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _refuse_waiting(self) -> None:
        """After close(): whatever is still queued gets an answer (an error), not a wait for its timeout."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(QueueFull("the service is shutting down"))

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._refuse_waiting()
                return
            collected, closing = self._collect(first)
            # A client that gave up (timeout) has cancelled its future: no work for it.
            batch = [(i, f) for i, f in collected if f.set_running_or_notify_cancel()]
            if batch:
                self._run_batch(batch)
            if closing:
                self._refuse_waiting()
                return

    def _run_batch(self, batch: list[tuple[T, Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        self.largest = max(self.largest, len(batch))
        try:
            results = list(self.run([item for item, _ in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
        except BaseException as error:  # noqa: BLE001 - every waiting request must be answered
            results = [error] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
