"""MicroBatcher: concurrent callers share batches, each gets its own results, a bad item fails only its caller, and
a batch stops waiting for company as soon as no request could still join it."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vlkit.serve.batching import MicroBatcher


def run_with(batcher_kwargs: dict, body):
    """Run ``body(batcher, sizes)`` on a started batcher whose fn doubles numbers (and refuses negative ones)."""
    sizes: list[int] = []

    def double(items: list[int]) -> list[int]:
        if any(x < 0 for x in items):
            raise ValueError(f"negative item in {items}")
        return [2 * x for x in items]

    async def main():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(double, executor=executor, on_batch=sizes.append, **batcher_kwargs)
            batcher.start()
            try:
                return await body(batcher)
            finally:
                await batcher.close()

    return asyncio.run(main()), sizes


def test_concurrent_callers_share_batches_and_get_their_own_results():
    async def body(batcher):
        return await asyncio.gather(*(batcher.submit([i, 100 + i]) for i in range(10)))

    results, sizes = run_with({"max_batch": 8, "max_wait_ms": 50}, body)
    assert results == [[2 * i, 200 + 2 * i] for i in range(10)]
    assert sum(sizes) == 20 and max(sizes) == 8 and len(sizes) == 3  # 8 + 8 + 4: full batches, none lost


def test_one_at_a_time_and_a_bad_item_fails_only_its_caller():
    async def body(batcher):
        return await asyncio.gather(batcher.submit([1]), batcher.submit([-1]), batcher.submit([3]),
                                    return_exceptions=True)  # fmt: skip

    (one, bad, three), sizes = run_with({"max_batch": 4, "max_wait_ms": 20}, body)
    assert one == [2] and three == [6] and isinstance(bad, ValueError)
    assert sizes[0] == 3  # the three shared a batch, which failed and was retried item by item

    results, sizes = run_with({"max_batch": 1, "max_wait_ms": 20}, lambda b: asyncio.gather(*(b.submit([i]) for i in
                                                                                               range(5))))  # fmt: skip
    assert results == [[2 * i] for i in range(5)] and sizes == [1] * 5


@pytest.mark.parametrize("idle", [True, False])
def test_a_batch_waits_for_company_only_while_a_request_could_join(idle):
    """With ``idle()`` True (every request already waits on a forward pass) a lone item runs at once; otherwise it
    waits ``max_wait_ms`` for company."""

    async def body(batcher):
        start = time.perf_counter()
        await batcher.submit([1])
        return time.perf_counter() - start

    seconds, _ = run_with({"max_batch": 8, "max_wait_ms": 300, "idle": lambda: idle}, body)
    assert seconds < 0.15 if idle else seconds >= 0.29
