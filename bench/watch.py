"""Watch delivery: how soon a put reaches its watchers, and how many events one can take.

* **Latency**: a writer puts one key, one put at a time; 1 or 100 watch
  streams on that key (spread over a few client sessions in this process)
  stamp each event as it comes out of ``WatchStream.next()``. Put-to-event
  latency runs from just before the put is sent to that moment, so it
  includes the durable commit. Reported per delivery (p50/p99 over every
  watcher) and until the last watcher had it.
* **Throughput**: the writer puts as fast as it can (64 in flight, bounded
  in count and time) while one watcher follows the subtree; events per
  second delivered to that watcher, from the first put to the last event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.cpu import CpuMeter
from bench.load import closed_loop, percentile
from bench.profile import Profile
from bench.runtime import progress
from kvstore.client import Client
from kvstore.watch_stream import WatchStream

DRAIN_SECONDS = 10.0
EVENT_TIMEOUT = 5.0


def _ms(samples: list[float], fraction: float) -> float | None:
    return round(percentile(samples, fraction) * 1000, 3) if samples else None


async def _close(streams: list[WatchStream], tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(stream.close() for stream in streams), return_exceptions=True)


async def latency(writer: Client, sessions: list[Client], watchers: int,
                  profile: Profile, meter: CpuMeter) -> dict[str, Any]:
    """Put-to-event latency with ``watchers`` streams on one key."""
    clock = time.perf_counter
    loop = asyncio.get_running_loop()
    key = f"/bench/watch/latency-{watchers}"
    streams = [sessions[i % len(sessions)].watch(key) for i in range(watchers)]
    tasks: list[asyncio.Task[Any]] = []
    sent: dict[int, float] = {}
    remaining: dict[int, int] = {}
    waiters: dict[int, asyncio.Future[None]] = {}
    deliveries: list[float] = []
    complete: list[float] = []
    put_latencies: list[float] = []
    missed = 0

    async def consume(stream: WatchStream) -> None:
        while True:
            event = await stream.next()
            now = clock()
            sequence = int(event.kv.value[:12])
            start = sent.get(sequence)
            if start is None:
                continue
            deliveries.append(now - start)
            remaining[sequence] -= 1
            if remaining[sequence] == 0:
                complete.append(now - start)
                waiter = waiters.pop(sequence, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    try:
        await asyncio.gather(*(stream.start() for stream in streams))
        tasks = [asyncio.ensure_future(consume(stream)) for stream in streams]
        meter.start()
        deadline = clock() + max(2 * profile.duration, 3.0)
        for sequence in range(profile.watch_puts):
            if clock() > deadline:
                break
            value = f"{sequence:012d}".encode().ljust(profile.value_bytes, b".")
            # Events may come before the put's answer: the waiter is set up first.
            waiters[sequence] = waiter = loop.create_future()
            remaining[sequence] = watchers
            sent[sequence] = start = clock()
            await writer.put(key, value)
            put_latencies.append(clock() - start)
            try:
                async with asyncio.timeout(EVENT_TIMEOUT):
                    await waiter
            except TimeoutError:
                missed += 1
                waiters.pop(sequence, None)
    finally:
        cpu = meter.stop()
        await _close(streams, tasks)
    return {
        "watchers": watchers,
        "sessions": min(watchers, len(sessions)),
        "puts": len(sent),
        "p50_ms": _ms(deliveries, 0.5),
        "p99_ms": _ms(deliveries, 0.99),
        "all_p50_ms": _ms(complete, 0.5),
        "all_p99_ms": _ms(complete, 0.99),
        "put_ack_p50_ms": _ms(put_latencies, 0.5),
        "deliveries": len(deliveries),
        "missed": missed,
        "cpu_percent": cpu,
    }


async def throughput(writer: Client, watcher: Client, profile: Profile,
                     meter: CpuMeter) -> dict[str, Any]:
    """Events per second delivered to one watcher while the writer puts flat out."""
    clock = time.perf_counter
    subtree = "/bench/watch/flood"
    value = bytes(profile.value_bytes)
    stream = watcher.watch(subtree, prefix=True)
    received = 0
    last = 0.0

    async def consume() -> None:
        nonlocal received, last
        while True:
            await stream.next()
            received += 1
            last = clock()

    async def put(sequence: int) -> object:
        return await writer.put(f"{subtree}/k{sequence % 1000:04d}", value)

    await stream.start()
    task = asyncio.ensure_future(consume())
    try:
        meter.start()
        begin = clock()
        result = await closed_loop(put, concurrency=64, max_ops=profile.max_ops,
                                   max_seconds=profile.duration)
        stopped = clock()
        cpu = meter.stop()
        behind = result.ops - received
        drain_deadline = stopped + DRAIN_SECONDS
        while received < result.ops and clock() < drain_deadline:
            await asyncio.sleep(0.02)
    finally:
        await _close([stream], [task])
    span = (last - begin) if last else 0.0
    return {
        "writer_puts": result.ops,
        "writer_ops_per_s": round(result.ops_per_s, 1),
        "writer_errors": result.errors,
        "events": received,
        "events_per_s": round(received / span, 1) if span > 0 else None,
        "behind_when_writer_stopped": behind,
        "drain_s": round(max(0.0, last - stopped), 3),
        "resubscriptions": max(0, stream.resubscriptions - 1),
        "cpu_percent_while_writing": cpu,
    }


async def measure_watch(writer: Client, sessions: list[Client], profile: Profile,
                        meter: CpuMeter) -> dict[str, Any]:
    """The three watch figures, through the given writer and watcher sessions."""
    progress("watch: delivery latency with 1 watcher")
    one = await latency(writer, sessions[:1], 1, profile, meter)
    progress(f"watch: delivery latency with {profile.watch_fanout} watchers "
             f"over {min(len(sessions), profile.watch_fanout)} sessions")
    many = await latency(writer, sessions, profile.watch_fanout, profile, meter)
    progress("watch: events per second to one watcher, writer flat out")
    flood = await throughput(writer, sessions[0], profile, meter)
    return {"latency_1": one, "latency_many": many, "throughput": flood}
