"""Several kinds of request measured side by side, in short alternating slices.

Sequential latencies drift by a third within seconds on a shared machine
(the cost of a wake-up, of a loopback send), and throughput under load by a
fifth between one measurement and the next: two full runs of the same code
put the get at 64 in flight at 0.91 and at 0.70 of the echo when each kind
ran its 4 s in turn. Slices in turn expose every kind to the same drift, so
their ratios hold still even when the machine does not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from bench.cpu import CpuMeter
from bench.load import LoadResult

Run = Callable[[int, float], Awaitable[LoadResult]]
"""(max_ops, max_seconds) -> one bounded closed-loop run of a kind."""

Sliced = dict[str, tuple[list[LoadResult], dict[str, float]]]
"""kind -> (one result per slice, CPU % of a core per process over the slices)."""


async def alternate(runs: Mapping[str, Run], *, warmup: float, duration: float,
                    slice_seconds: float, max_ops: int, meter: CpuMeter) -> Sliced:
    """Warm every kind up, then run each for ``duration`` in all, a slice at a time.

    The kinds take turns in the order given, starting one further along at
    each slice, so that no kind always follows the same one.
    """
    kinds = list(runs)
    for kind in kinds:
        await runs[kind](max_ops, warmup)
    slices = max(1, round(duration / slice_seconds))
    found: Sliced = {kind: ([], {}) for kind in kinds}
    for number in range(slices):
        shift = number % len(kinds)
        for kind in [*kinds[shift:], *kinds[:shift]]:
            meter.start()
            result = await runs[kind](max(1, max_ops // slices), duration / slices)
            results, cpu = found[kind]
            results.append(result)
            for name, percent in meter.stop().items():
                cpu[name] = cpu.get(name, 0.0) + percent / slices
    return found
