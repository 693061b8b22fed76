"""Micro-batching: the items of concurrent requests share one forward pass.

A :class:`MicroBatcher` collects items (texts to embed, decoded images) from whatever requests are waiting, up to
``max_batch`` items or until ``max_wait_ms`` after the first of them arrived, and runs them through ``fn`` in a
worker thread, so the event loop keeps accepting requests meanwhile; while one batch runs, the next one fills up.
Each request gets back its own results. A batch that fails is retried item by item, so that one bad item fails only
the request it came from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

IDLE_CHECK_YIELDS = 3  # event-loop turns before asking idle(): a received request needs a few to reach the queue


class MicroBatcher:
    """Batched calls of ``fn(items) -> results`` (one result per item, in order) for concurrent callers.

    Args:
        fn: runs one batch; called in ``executor`` (one thread: forward passes run one at a time).
        max_batch: the most items per call of ``fn``; 1 serves one item at a time (the baseline of the load test).
        max_wait_ms: how long the first item of a batch waits for company.
        executor: where ``fn`` runs.
        on_batch: called with the size of every batch (the metrics' batch-size histogram).
        idle: says whether any request could still add items (False) or all are waiting on results (True); when
            given, a batch stops waiting for company as soon as it is True, since only a request not yet sent could
            join it.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int,
        max_wait_ms: float,
        executor: Executor,
        on_batch: Callable[[int], None] | None = None,
        idle: Callable[[], bool] | None = None,
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.executor, self.on_batch, self.idle = executor, on_batch, idle
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch running)."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start collecting; call from the running event loop (the app's startup)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """The results of ``items``, computed in batches with other callers' items; raises the exception of the
        first of its items that failed."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self._queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:  # what is already queued joins at once; then wait for more until the deadline
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                if self.idle is not None:
                    for _ in range(IDLE_CHECK_YIELDS):  # requests already received get to parse and queue their items
                        await asyncio.sleep(0)
                    if not self._queue.empty():
                        continue
                    if self.idle():
                        break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(item, future) for item, future in batch if not future.cancelled()]  # callers that went away
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for item, _ in batch]
        if self.on_batch is not None:
            self.on_batch(len(items))
        try:
            results = await loop.run_in_executor(self.executor, self.fn, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            outcomes = [(result, None) for result in results]
        except Exception as e:  # noqa: BLE001 (reported to the callers)
            if len(items) == 1:
                outcomes = [(None, e)]
            else:  # find the bad items: only their requests fail
                outcomes = [await self._one(loop, item) for item in items]
        for (_, future), (result, error) in zip(batch, outcomes):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    async def _one(self, loop: asyncio.AbstractEventLoop, item: Any) -> tuple[Any, Exception | None]:
        try:
            return (await loop.run_in_executor(self.executor, self.fn, [item]))[0], None
        except Exception as e:  # noqa: BLE001
            return None, e
