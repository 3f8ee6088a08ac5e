"""A closed-loop load generator: keep K requests in flight, record every latency.

``concurrency`` workers each send one request, wait for its answer and send
the next, so exactly K requests are in flight until the run ends. A run ends
at ``max_ops`` requests or ``max_seconds`` seconds, whichever comes first;
requests already in flight then finish (each is bounded by its own timeout)
and a hard limit cancels whatever is left.

:func:`closed_loop` drives asyncio clients (the store, the echo);
:func:`threaded_closed_loop` drives synchronous ones (etcd's Python client)
with one thread per request in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

Operation = Callable[[int], Awaitable[object]]
"""One request: called with the request's sequence number, awaited until answered."""

SyncOperation = Callable[[int], object]
"""One blocking request: called with the request's sequence number, returns when answered."""


@dataclass
class LoadResult:
    """What one closed-loop run did."""

    concurrency: int
    ops: int
    """Requests answered successfully."""
    errors: int
    elapsed: float
    """Seconds from the first request sent to the last answer received."""
    latencies: list[float] = field(repr=False, default_factory=list)
    """Seconds, one per successful request."""
    first_error: str | None = None

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) * 1000.0

    @classmethod
    def combined(cls, results: Sequence[LoadResult]) -> LoadResult:
        """Runs of one kind (the slices of a round) taken as one run."""
        return cls(results[0].concurrency if results else 0,
                   sum(result.ops for result in results),
                   sum(result.errors for result in results),
                   sum(result.elapsed for result in results),
                   [latency for result in results for latency in result.latencies],
                   next((result.first_error for result in results if result.first_error), None))


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (NaN when there are none)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def closed_loop(operation: Operation, *, concurrency: int, max_ops: int,
                      max_seconds: float, grace: float = 10.0) -> LoadResult:
    """Run ``operation`` with ``concurrency`` requests in flight until a bound is hit.

    ``grace`` bounds how long requests still in flight at the deadline may
    take before they are cancelled (and counted as errors).
    """
    if concurrency < 1 or max_ops < 1 or max_seconds <= 0:
        raise ValueError("concurrency, max_ops and max_seconds must be positive")
    clock = time.perf_counter
    latencies: list[float] = []
    issued = 0
    errors = 0
    first_error: str | None = None
    begin = clock()
    deadline = begin + max_seconds

    async def worker() -> None:
        nonlocal issued, errors, first_error
        while issued < max_ops and clock() < deadline:
            sequence = issued
            issued += 1
            start = clock()
            try:
                await operation(sequence)
            except Exception as error:
                errors += 1
                if first_error is None:
                    first_error = f"{type(error).__name__}: {error}"
                continue
            latencies.append(clock() - start)

    workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        done, pending = await asyncio.wait(workers, timeout=max_seconds + grace)
    finally:
        for task in workers:  # also when this run is itself cancelled
            task.cancel()
    if pending:
        await asyncio.wait(pending)
        errors += len(pending)
        first_error = first_error or f"{len(pending)} requests still unanswered after the grace"
    for task in done:
        if task.exception() is not None:  # a worker itself failed, not one request
            raise task.exception()  # type: ignore[misc]
    elapsed = clock() - begin
    return LoadResult(concurrency, len(latencies), errors, elapsed, latencies, first_error)


def threaded_closed_loop(operation: SyncOperation, *, concurrency: int, max_ops: int,
                         max_seconds: float, grace: float = 10.0) -> LoadResult:
    """:func:`closed_loop` for blocking clients: ``concurrency`` threads, one request each.

    Threads cannot be cancelled: each request must be bounded by its own
    timeout. A thread still busy ``grace`` seconds after the deadline is left
    behind (it is a daemon) and counted as one error.
    """
    if concurrency < 1 or max_ops < 1 or max_seconds <= 0:
        raise ValueError("concurrency, max_ops and max_seconds must be positive")
    clock = time.perf_counter
    sequence = itertools.count()  # next() is atomic under the GIL
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    first_errors: list[str | None] = [None] * concurrency
    begin = clock()
    deadline = begin + max_seconds

    def worker(index: int) -> None:
        mine = latencies[index]
        while clock() < deadline:
            number = next(sequence)
            if number >= max_ops:
                return
            start = clock()
            try:
                operation(number)
            except Exception as error:
                errors[index] += 1
                if first_errors[index] is None:
                    first_errors[index] = f"{type(error).__name__}: {error}"
                continue
            mine.append(clock() - start)

    threads = [threading.Thread(target=worker, args=(index,), name=f"bench-load-{index}",
                                daemon=True) for index in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline + grace - clock()))
    stuck = sum(thread.is_alive() for thread in threads)
    elapsed = clock() - begin
    first_error = next((error for error in first_errors if error), None)
    if stuck:
        first_error = first_error or f"{stuck} requests still unanswered after the grace"
    merged = [latency for mine in latencies for latency in mine]
    return LoadResult(concurrency, len(merged), sum(errors) + stuck, elapsed, merged,
                      first_error)
