"""A closed-loop load generator: keep K requests in flight, record every latency.

``concurrency`` workers each send one request, wait for its answer and send
the next, so exactly K requests are in flight until the run ends. A run ends
at ``max_ops`` requests or ``max_seconds`` seconds, whichever comes first;
requests already in flight then finish (each is bounded by its own timeout)
and a hard limit cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

Operation = Callable[[int], Awaitable[object]]
"""One request: called with the request's sequence number, awaited until answered."""


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
