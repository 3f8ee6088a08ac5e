"""The side-by-side figures: the echo ceiling, the store, and etcd, in rotating rounds.

One private Prosody with one storage node owning ``/``, the echo responder
in a process of its own, and (when installed) one private etcd, loaded by a
process of its own (:mod:`bench.etcd_driver`). Every round
measures, at each number of requests in flight, every kind below in a
rotating order, so the three systems share the machine's noise:

* ``echo``: a raw IQ round trip (the ceiling), also at 256 in flight;
* ``echo-item``: the same round trip answered with an item like a get's
  answer, and ``echo-put``: carrying the value in the request and answered
  like a put (the value's bytes routed, none of the store's work);
* ``get``, ``put`` (durable), ``prefix`` (``get_prefix`` of a 100-key
  subtree), ``batch`` (``txn`` of 100 puts) and ``put_many`` (100 keys);
* ``etcd-get``, ``etcd-put``, ``etcd-prefix`` and ``etcd-batch`` (one etcd
  transaction of 100 puts): the same keys, values and concurrency, through
  the synchronous etcd3 client with one thread per request in flight, in
  the driver's process.

Within a round, the kinds of one concurrency are measured in short
alternating slices (:meth:`CoreBench.measure_slices`), so that a drift of
the machine within the round (a slow spell of the disk, of wake-ups, of the
host) reaches each of them alike. Requests of 100 keys keep one run of the
whole duration each from 16 in flight on: they take tens to hundreds of
milliseconds there, and a slice ends by waiting for the requests still in
flight.

The same setup then times full listings of a 10,000-child directory
(:func:`measure_list`); :mod:`bench.watch` uses it for watch delivery.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.cpu import CpuMeter
from bench.echo import EchoRequester, ResponderProcess
from bench.etcd import Availability, EtcdError, EtcdServer
from bench.etcd_driver import EtcdDriver
from bench.load import LoadResult, closed_loop
from bench.profile import Profile
from bench.report import ECHO, ECHO_ITEM, ECHO_PUT, Figure, Figures, Kind
from bench.runtime import Processes, guarded, progress, run_async
from bench.slices import Run, Sliced, alternate
from bench.watch import measure_watch
from bench.workload import Workload
from kvstore.client import Client
from kvstore.devcluster import DevCluster
from protocol.model import Put

CONCURRENCIES = [1, 16, 64]
SLICE_SECONDS = 0.5
"""Length of the alternating slices at 1 in flight, where latency drifts fastest."""
LOADED_SLICE_SECONDS = 1.0
"""Length of the slices from 16 in flight on. A slice ends by waiting for the
requests still in flight (one latency: 4-11 ms at 64 for one key), which a
longer slice keeps near 1% of its time."""
ECHO_CONCURRENCIES = [1, 16, 64, 256]

STORE_KINDS = [
    Kind(ECHO, "echo"),
    Kind(ECHO_ITEM, "echo"),
    Kind(ECHO_PUT, "echo"),
    Kind("get", "store", peer="etcd-get"),
    Kind("put", "store", peer="etcd-put"),
    Kind("prefix", "store", 100, peer="etcd-prefix"),
    Kind("batch", "store", 100, peer="etcd-batch"),
    Kind("put_many", "store", 100, peer="etcd-batch"),
]
ETCD_KINDS = [
    Kind("etcd-get", "etcd"),
    Kind("etcd-put", "etcd"),
    Kind("etcd-prefix", "etcd", 100),
    Kind("etcd-batch", "etcd", 100),
]


Runner = Callable[[int, int, float], Any]
"""(concurrency, max_ops, max_seconds) -> an awaitable LoadResult."""


async def populate(client: Client, keys: Sequence[str], value: bytes, *,
                   chunk: int = 500, max_seconds: float = 120.0) -> None:
    """Write ``value`` under every key with put_many, 8 requests in flight; fail on any loss."""
    chunks = [list(keys[start:start + chunk]) for start in range(0, len(keys), chunk)]

    async def write(sequence: int) -> object:
        return await client.put_many(dict.fromkeys(chunks[sequence], value))

    result = await closed_loop(write, concurrency=min(8, len(chunks)), max_ops=len(chunks),
                               max_seconds=max_seconds)
    if result.ops != len(chunks):
        raise RuntimeError(f"populating wrote {result.ops} of {len(chunks)} chunks "
                           f"({result.errors} errors; first: {result.first_error})")


class CoreBench:
    """The operations of every kind, and the rounds that measure them side by side."""

    def __init__(self, profile: Profile, client: Client, requester: EchoRequester,
                 etcd: EtcdDriver | None, pids: dict[str, int | None]) -> None:
        self.profile = profile
        self.client = client
        self.requester = requester
        self.etcd = etcd
        self.work = Workload.make(profile)
        self.meter = CpuMeter({"bench": os.getpid(), **pids})
        self.kinds = STORE_KINDS + (ETCD_KINDS if etcd is not None else [])
        self.runners: dict[str, Runner] = {}
        self._build_store()
        if etcd is not None:
            self._build_etcd(etcd)

    # --- the operations -------------------------------------------------

    def _async_runner(self, operation: Callable[[int], Any]) -> Runner:
        def run(concurrency: int, max_ops: int, max_seconds: float) -> Any:
            return closed_loop(operation, concurrency=concurrency, max_ops=max_ops,
                               max_seconds=max_seconds)
        return run

    def _build_store(self) -> None:
        client, work = self.client, self.work
        value, size = work.value, self.profile.batch_size
        txns = [[Put(key, value) for key in batch] for batch in work.batches]
        many = [dict.fromkeys(batch, value) for batch in work.batches]

        def echo(_: int) -> asyncio.Future[None]:
            return self.requester.request()

        def echo_item(_: int) -> asyncio.Future[None]:
            return self.requester.request(answer_bytes=len(value))

        def echo_put(_: int) -> asyncio.Future[None]:
            return self.requester.request(carry=value)

        async def get(sequence: int) -> object:
            return await client.get(work.get_keys[sequence % len(work.get_keys)])

        async def put(sequence: int) -> object:
            return await client.put(work.put_keys[sequence % len(work.put_keys)], value)

        async def prefix(sequence: int) -> object:
            found = await client.get_prefix(work.prefixes[sequence % len(work.prefixes)])
            if len(found.items) != size:
                raise RuntimeError(f"get_prefix returned {len(found.items)} keys, not {size}")
            return found

        async def batch(sequence: int) -> object:
            return await client.txn(success=txns[sequence % len(txns)])

        async def put_many(sequence: int) -> object:
            return await client.put_many(many[sequence % len(many)])

        for name, operation in (("echo", echo), (ECHO_ITEM, echo_item), (ECHO_PUT, echo_put),
                                ("get", get),
                                ("put", put), ("prefix", prefix), ("batch", batch),
                                ("put_many", put_many)):
            self.runners[name] = self._async_runner(operation)

    def _build_etcd(self, etcd: EtcdDriver) -> None:
        def runner(kind: str) -> Runner:
            def run(concurrency: int, max_ops: int, max_seconds: float) -> Any:
                return etcd.run(kind, concurrency, max_ops, max_seconds)
            return run

        for kind in ETCD_KINDS:
            self.runners[kind.name] = runner(kind.name)

    # --- data -------------------------------------------------------------

    async def populate(self) -> None:
        work = self.work
        keys = work.populated_keys
        progress(f"populating the store: {len(keys):,} keys of {len(work.value)} bytes")
        await populate(self.client, keys, work.value)
        if (await self.client.get(work.get_keys[-1])).value != work.value:
            raise RuntimeError("a populated key reads back a different value")
        if self.etcd is not None:
            progress(f"populating etcd: the same {len(keys):,} keys")
            await self.etcd.populate()

    # --- measuring --------------------------------------------------------

    async def measure(self, kind: str, concurrency: int) -> tuple[LoadResult, dict[str, float]]:
        """A warm-up, then one bounded, recorded run with the CPU use of every process."""
        run = self.runners[kind]
        profile = self.profile
        await run(concurrency, profile.max_ops, profile.warmup)
        self.meter.start()
        result = await run(concurrency, profile.max_ops, profile.duration)
        return result, self.meter.stop()

    async def measure_slices(self, kinds: Sequence[str], concurrency: int) -> Sliced:
        """Every kind in short alternating slices, for as long as one measurement each."""
        profile = self.profile

        def run(kind: str) -> Run:
            return lambda max_ops, seconds: self.runners[kind](concurrency, max_ops, seconds)

        return await alternate(
            {kind: run(kind) for kind in kinds}, warmup=profile.warmup,
            duration=profile.duration, max_ops=profile.max_ops, meter=self.meter,
            slice_seconds=SLICE_SECONDS if concurrency == 1 else LOADED_SLICE_SECONDS)

    async def rounds(self) -> Figures:
        figures: Figures = {}
        names = [kind.name for kind in self.kinds]
        keys_per_op = {kind.name: kind.keys_per_op for kind in self.kinds}

        def record(round_number: int, kind: str, concurrency: int, runs: list[LoadResult],
                   cpu: dict[str, float]) -> None:
            figure = figures.setdefault((kind, concurrency), Figure(kind, concurrency))
            figure.runs.extend(runs)
            figure.cpu.append(cpu)
            total = LoadResult.combined(runs)
            progress(
                f"round {round_number + 1}/{self.profile.rounds}  {concurrency:>3} in "
                f"flight  {kind:<12} {total.ops_per_s:>8,.0f} ops/s  "
                f"p50 {total.percentile_ms(0.5):7.2f} ms  "
                f"p99 {total.percentile_ms(0.99):7.2f} ms  errors {total.errors}")

        for round_number in range(self.profile.rounds):
            # Rotate the order each round so no kind always follows the same one.
            shift = round_number % len(names)
            order = names[shift:] + names[:shift]
            for concurrency in ECHO_CONCURRENCIES:
                kinds = [kind for kind in order
                         if concurrency in CONCURRENCIES or kind == ECHO]
                sliced = [kind for kind in kinds
                          if concurrency == 1 or keys_per_op[kind] == 1]
                for kind, (runs, cpu) in (await self.measure_slices(sliced, concurrency)).items():
                    record(round_number, kind, concurrency, runs, cpu)
                for kind in kinds:
                    if kind not in sliced:
                        result, cpu = await self.measure(kind, concurrency)
                        record(round_number, kind, concurrency, [result], cpu)
        return figures


async def measure_list(client: Client, profile: Profile, meter: CpuMeter) -> dict[str, Any]:
    """Milliseconds per full listing of a directory of ``list_children`` children.

    ``Client.list`` pages through the node's answers (at most ``max_page``
    names, 1,000 by default, per request), so a full listing is several
    round trips; it is timed from the first request to the last answer.
    """
    directory = "/bench/dir"
    children = [f"{directory}/c{i:05d}" for i in range(profile.list_children)]
    progress(f"populating {len(children):,} children of {directory}")
    await populate(client, children, b"x", chunk=1000)
    expected = len(children)

    async def listing(_: int) -> object:
        found = await client.list(directory, timeout=30.0)
        if len(found.names) != expected or found.more:
            raise RuntimeError(f"list returned {len(found.names)} names, not {expected}")
        return found

    await closed_loop(listing, concurrency=1, max_ops=3, max_seconds=profile.warmup + 5)
    meter.start()
    result = await closed_loop(listing, concurrency=1, max_ops=500,
                               max_seconds=max(profile.duration, 2.0))
    cpu = meter.stop()
    mean = sum(result.latencies) / len(result.latencies) * 1000 if result.latencies else math.nan
    entry: dict[str, Any] = {
        "children": expected,
        "listings": result.ops,
        "p50_ms": round(result.percentile_ms(0.5), 2),
        "p99_ms": round(result.percentile_ms(0.99), 2),
        "mean_ms": round(mean, 2),
        "names_per_s": round(expected * result.ops_per_s),
        "errors": result.errors,
        "cpu_percent": cpu,
    }
    if result.first_error:
        entry["first_error"] = result.first_error
    return entry


# --- the part as a whole ----------------------------------------------------


async def _measure_all(cluster: DevCluster, responder: ResponderProcess,
                       etcd: EtcdDriver | None, profile: Profile,
                       pids: dict[str, int | None]) -> dict[str, Any]:
    requester = EchoRequester(cluster.settings("bench-echo"), responder.jid)
    client = Client(cluster.settings(), resource="bench")
    sessions: list[Client] = []
    try:
        await requester.start()
        await client.connect()
        bench = CoreBench(profile, client, requester, etcd, pids)
        await bench.populate()
        figures = await bench.rounds()
        listing = await guarded("list", measure_list(client, profile, bench.meter))
        progress(f"list: p50 {listing.get('p50_ms')} ms per full listing")
        settings = cluster.settings("bench-watch")
        sessions = [Client(settings, resource=f"watch{i}")
                    for i in range(profile.watch_sessions)]

        async def watch() -> dict[str, Any]:
            await asyncio.gather(*(session.connect() for session in sessions))
            return await measure_watch(client, sessions, profile, bench.meter)

        return {"figures": figures, "kinds": bench.kinds, "list": listing,
                "watch": await guarded("watch", watch())}
    finally:
        await asyncio.gather(*(session.close() for session in sessions),
                             return_exceptions=True)
        try:
            await client.close()
        finally:
            await requester.stop()


def run(folder: Path, profile: Profile, etcd: Availability) -> dict[str, Any]:
    """Start the part's servers, measure, and stop every process started (also on Ctrl-C)."""
    with Processes() as processes:
        cluster = DevCluster(folder / "cluster", shards=["/"], log_level="warning")
        processes.add("the cluster", cluster.stop)
        progress(f"core: starting Prosody and a storage node under {cluster.folder}")
        cluster.start()
        responder = ResponderProcess(cluster.settings("bench-responder"),
                                     folder / "responder.log")
        processes.add("the echo responder", responder.stop)
        responder.start()
        server: EtcdServer | None = None
        driver: EtcdDriver | None = None
        etcd_error = ""
        if etcd.ok and etcd.binary is not None:
            server = EtcdServer(etcd.binary, folder / "etcd")
            processes.add("etcd", server.stop)
            progress(f"core: starting etcd {etcd.version} under {server.folder}")
            try:
                server.start()
                driver = EtcdDriver(server.client_port, profile, folder / "etcd-driver.log")
                processes.add("etcd's load driver", driver.stop)
                driver.start()
            except EtcdError as error:
                etcd_error = f"etcd did not start: {error}"
                progress(f"core: etcd figures skipped: {etcd_error}")
                server = driver = None
        else:
            progress(f"core: etcd figures skipped: {etcd.reason}")
        node = next(iter(cluster.nodes.values()))
        pids = {"responder": responder.pid, "node": node.pid, "prosody": cluster.prosody.pid,
                "etcd": server.pid if server else None,
                "etcd-client": driver.pid if driver else None}
        result = run_async(_measure_all(cluster, responder, driver, profile, pids))
        if etcd_error:
            result["etcd_error"] = etcd_error
        return result
