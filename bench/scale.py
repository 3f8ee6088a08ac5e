"""Cost as the work grows: a shard of 10,000 keys against one of 1,000,000, one shard
against four, and the storage node's memory with many keys and 1,000 watchers.

One private Prosody serves six storage nodes, so every figure is measured
side by side, in rotating rounds of alternating 1 s slices, through the same
server:

* ``node1`` owns ``/`` and holds 10,000 keys under ``/small``;
* ``node2`` owns ``/large`` and holds 1,000,000 keys (200,000 with ``--quick``);
* ``node3`` to ``node6`` own ``/multi/a`` .. ``/multi/d`` and hold 10,000
  keys between them: the client routes each request to its shard's node.

The keys are written before the nodes start, straight into each node's
data folder with :class:`kvstore.storage.Engine` (unsynced, in transactions
of 1,000 puts, then one sync): the same records and change log the node
would have written, at about 100,000 keys a second instead of a few
thousand. Gets read keys spread evenly over the whole shard in a scrambled
order; puts overwrite them the same way (durably, through the node).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cpu import CpuMeter, memory_kib
from bench.load import LoadResult, closed_loop
from bench.profile import Profile
from bench.report import Figure, fmt, ratio
from bench.runtime import Processes, guarded, progress, run_async
from bench.slices import Run, alternate
from kvstore.client import Client
from kvstore.devcluster import DevCluster
from kvstore.storage import Engine, TxnOp
from protocol.model import Put

CONCURRENCY = 64
SLICE_SECONDS = 1.0
SMALL_SHARD = "/"
LARGE_SHARD = "/large"
SCRAMBLE = 2_654_435_761
"""A prime: ``i * SCRAMBLE mod n`` visits every index below ``n`` (n has no such factor)."""


def scrambled(sequence: int, count: int) -> int:
    return (sequence * SCRAMBLE) % count


@dataclass(frozen=True)
class Layout:
    """Where the keys of each setup live."""

    small: int
    large: int
    shards: int

    @property
    def multi_shards(self) -> list[str]:
        return [f"/multi/{chr(ord('a') + i)}" for i in range(self.shards)]

    @property
    def cluster_shards(self) -> list[str]:
        return [SMALL_SHARD, LARGE_SHARD, *self.multi_shards]

    @staticmethod
    def small_key(index: int) -> str:
        return f"/small/k{index:07d}"

    @staticmethod
    def large_key(index: int) -> str:
        return f"/large/k{index:07d}"

    def multi_key(self, index: int) -> str:
        return f"{self.multi_shards[index % self.shards]}/k{index // self.shards:07d}"


def prepopulate(data_dir: Path, shard: str, keys: Iterable[str], value: bytes,
                per_txn: int = 1000) -> int:
    """Write ``keys`` into a node's (stopped) LMDB environment; returns how many."""
    engine = Engine(data_dir, [shard], sync=False)
    written = 0
    try:
        batch: list[Put] = []

        def flush() -> None:
            nonlocal written, batch
            outcome = engine.apply([TxnOp(shard, [], batch, [])])[0]
            if outcome.error is not None:
                raise RuntimeError(f"prepopulating {shard} failed: {outcome.error}")
            written += len(batch)
            batch = []

        for key in keys:
            batch.append(Put(key, value))
            if len(batch) >= per_txn:
                flush()
        if batch:
            flush()
        engine.env.sync(True)
    finally:
        engine.close()
    return written


def _disk_bytes(folder: Path) -> int:
    return sum(path.stat().st_blocks * 512 for path in folder.glob("*.mdb"))


@dataclass(frozen=True)
class ScaleKind:
    name: str
    label: str
    keys: int
    server: str
    """The CPU meter entry of the node(s) serving it."""
    baseline: str | None
    """The kind it is compared with (the same operation on the 10,000-key shard)."""


class ScaleBench:
    def __init__(self, cluster: DevCluster, client: Client, layout: Layout,
                 profile: Profile) -> None:
        self.cluster = cluster
        self.client = client
        self.layout = layout
        self.profile = profile
        self.value = bytes(i % 256 for i in range(profile.value_bytes))
        nodes = list(cluster.nodes.values())
        self.small_pid = nodes[0].pid or 0
        self.large_pid = nodes[1].pid or 0
        self.meter = CpuMeter({"bench": os.getpid(), "prosody": cluster.prosody.pid,
                               "node-10k": self.small_pid, "node-large": self.large_pid,
                               "nodes-sharded": [node.pid for node in nodes[2:] if node.pid]})
        large = f"{layout.large:,}"
        self.kinds = [
            ScaleKind("get_10k", "get, 1 shard, 10,000 keys", layout.small, "node-10k", None),
            ScaleKind("put_10k", "put, 1 shard, 10,000 keys", layout.small, "node-10k", None),
            ScaleKind("get_large", f"get, 1 shard, {large} keys", layout.large, "node-large",
                      "get_10k"),
            ScaleKind("put_large", f"put, 1 shard, {large} keys", layout.large, "node-large",
                      "put_10k"),
            ScaleKind("get_sharded", f"get, {layout.shards} shards, 10,000 keys",
                      layout.small, "nodes-sharded", "get_10k"),
            ScaleKind("put_sharded", f"put, {layout.shards} shards, 10,000 keys",
                      layout.small, "nodes-sharded", "put_10k"),
        ]
        self.operations = self._operations()

    def _operations(self) -> dict[str, Callable[[int], Any]]:
        client, layout, value = self.client, self.layout, self.value
        small, large = layout.small, layout.large

        def reader(key: Callable[[int], str], count: int) -> Callable[[int], Any]:
            async def get(sequence: int) -> object:
                return await client.get(key(scrambled(sequence, count)))
            return get

        def writer(key: Callable[[int], str], count: int) -> Callable[[int], Any]:
            async def put(sequence: int) -> object:
                return await client.put(key(scrambled(sequence, count)), value)
            return put

        return {
            "get_10k": reader(layout.small_key, small),
            "put_10k": writer(layout.small_key, small),
            "get_large": reader(layout.large_key, large),
            "put_large": writer(layout.large_key, large),
            "get_sharded": reader(layout.multi_key, small),
            "put_sharded": writer(layout.multi_key, small),
        }

    async def check(self) -> dict[str, int]:
        """Every node serves the keys written into its folder (guards the layout)."""
        counts = {shard.prefix: shard.keys
                  for node in await self.client.status() for shard in node.shards}
        layout = self.layout
        expected = {SMALL_SHARD: layout.small, LARGE_SHARD: layout.large}
        per_shard = layout.small // layout.shards
        expected.update(dict.fromkeys(layout.multi_shards, per_shard))
        for shard, count in expected.items():
            if counts.get(shard, 0) < count:
                raise RuntimeError(f"shard {shard} serves {counts.get(shard, 0)} keys, "
                                   f"expected {count}: the prepopulated data was not found")
        await self.client.get(layout.large_key(layout.large - 1))
        await self.client.get(layout.multi_key(layout.small - 1))
        return counts

    async def rounds(self) -> dict[str, Figure]:
        """Every setup in alternating 1 s slices per round (:mod:`bench.slices`).

        Each 1,000,000-key figure is compared with its 10,000-key one: when
        each ran its 4 s in turn, the ratio of the puts moved between 0.72
        and 0.93 from run to run, more than the machine's drift allows to
        read.
        """
        figures = {kind.name: Figure(kind.name, CONCURRENCY) for kind in self.kinds}
        names = [kind.name for kind in self.kinds]
        profile = self.profile

        def run(operation: Callable[[int], Any]) -> Run:
            return lambda max_ops, seconds: closed_loop(
                operation, concurrency=CONCURRENCY, max_ops=max_ops, max_seconds=seconds)

        for round_number in range(profile.rounds):
            shift = round_number % len(names)
            found = await alternate(
                {name: run(self.operations[name]) for name in names[shift:] + names[:shift]},
                warmup=profile.warmup, duration=profile.duration, slice_seconds=SLICE_SECONDS,
                max_ops=profile.max_ops, meter=self.meter)
            for name, (results, cpu) in found.items():
                figures[name].runs.extend(results)
                figures[name].cpu.append(cpu)
                total = LoadResult.combined(results)
                progress(f"scale round {round_number + 1}/{profile.rounds}  {name:<12} "
                         f"{total.ops_per_s:>8,.0f} ops/s  "
                         f"p50 {total.percentile_ms(0.5):7.2f} ms  errors {total.errors}")
        return figures

    async def memory(self) -> dict[str, Any]:
        """RSS of the large shard's node before and after ``memory_watchers`` watches."""
        profile, layout = self.profile, self.layout
        before = memory_kib(self.large_pid)
        small = memory_kib(self.small_pid)
        settings = self.cluster.settings("bench-memory")
        sessions = [Client(settings, resource=f"memory{i}")
                    for i in range(profile.watch_sessions)]
        per_session = math.ceil(profile.memory_watchers / len(sessions))
        streams = []
        clock = time.perf_counter
        try:
            await asyncio.gather(*(session.connect() for session in sessions))
            begin = clock()
            for number, session in enumerate(sessions):
                first = number * per_session
                mine = [session.watch(layout.large_key(scrambled(i, layout.large)))
                        for i in range(first, min(first + per_session, profile.memory_watchers))]
                streams += mine
                await asyncio.gather(*(stream.start() for stream in mine))
            setup = clock() - begin
            watching = sum(node.watchers for node in await self.client.status()
                           if node.jid == self.cluster.nodes["node2"].jid)
            await asyncio.sleep(1.0)
            after = memory_kib(self.large_pid)
        finally:
            await asyncio.gather(*(stream.close() for stream in streams), return_exceptions=True)
            await asyncio.gather(*(session.close() for session in sessions),
                                 return_exceptions=True)
        data_dir = self.cluster.nodes["node2"].folder / "data"
        anon_delta = after.get("anon", 0) - before.get("anon", 0)
        return {
            "large_keys": layout.large,
            "watchers": len(streams),
            "watchers_seen_by_node": watching,
            "watch_setup_s": round(setup, 2),
            "node_10k_kib": small,
            "node_large_kib": before,
            "node_large_with_watchers_kib": after,
            "anon_kib_per_watcher": round(anon_delta / len(streams), 2) if streams else None,
            "lmdb_disk_bytes": _disk_bytes(data_dir),
            "prosody_kib": memory_kib(self.cluster.prosody.pid or 0),
        }


def table(figures: dict[str, Figure], kinds: list[ScaleKind]) -> str:
    header = (f"{'setup (64 in flight)':<36} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'vs 10k':>7} {'errors':>6}  CPU % (bench / node(s) / prosody)")
    lines = [header, "-" * len(header)]
    for kind in kinds:
        figure = figures[kind.name]
        base = figures.get(kind.baseline) if kind.baseline else None
        versus = ratio(figure.ops_per_s, base.ops_per_s) if base else None
        cpu = figure.cpu_percent
        usage = " / ".join(fmt(cpu.get(name), 0) for name in ("bench", kind.server, "prosody"))
        lines.append(f"{kind.label:<36} {fmt(figure.ops_per_s, 0):>8} {fmt(figure.p50_ms):>8} "
                     f"{fmt(figure.p99_ms):>8} {fmt(versus):>7} {figure.errors:>6}  {usage}")
    return "\n".join(lines)


def summary(figures: dict[str, Figure], kinds: list[ScaleKind]) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": CONCURRENCY}
    for kind in kinds:
        figure = figures[kind.name]
        entry = figure.entry()
        entry["keys"] = kind.keys
        if kind.baseline:
            entry["vs_10k"] = ratio(figure.ops_per_s, figures[kind.baseline].ops_per_s)
        out[kind.name] = entry
    return out


def _key_stream(layout: Layout) -> Iterator[tuple[str, str, int, Iterable[str]]]:
    """(node name, shard, count, keys) for every node, in the cluster's node order."""
    yield "node1", SMALL_SHARD, layout.small, map(layout.small_key, range(layout.small))
    yield "node2", LARGE_SHARD, layout.large, map(layout.large_key, range(layout.large))
    for number, shard in enumerate(layout.multi_shards):
        keys = (layout.multi_key(i) for i in range(number, layout.small, layout.shards))
        yield f"node{number + 3}", shard, layout.small // layout.shards, keys


async def _measure(cluster: DevCluster, layout: Layout, profile: Profile) -> dict[str, Any]:
    client = Client(cluster.settings(), resource="bench-scale")
    try:
        await client.connect()
        bench = ScaleBench(cluster, client, layout, profile)
        await bench.check()
        figures = await bench.rounds()
        progress(f"memory: {profile.memory_watchers:,} watchers on the "
                 f"{layout.large:,}-key node")
        memory = await guarded("memory", bench.memory())
        return {"figures": figures, "kinds": bench.kinds, "memory": memory}
    finally:
        await client.close()


def run(folder: Path, profile: Profile) -> dict[str, Any]:
    """Prepopulate, start the six-node cluster, measure, stop everything."""
    layout = Layout(profile.small_keys, profile.large_keys, profile.shard_count)
    with Processes() as processes:
        cluster = DevCluster(folder / "scale", shards=layout.cluster_shards, log_level="warning")
        processes.add("the scale cluster", cluster.stop)
        value = bytes(i % 256 for i in range(profile.value_bytes))
        began = time.perf_counter()
        for name, shard, count, keys in _key_stream(layout):
            # DevCluster's layout: node N's data in FOLDER/nodeN/data (checked after start).
            progress(f"scale: writing {count:,} keys of shard {shard} into {name}'s data")
            prepopulate(cluster.folder / name / "data", shard, keys, value)
        populate_s = time.perf_counter() - began
        progress(f"scale: starting Prosody and {len(layout.cluster_shards)} storage nodes")
        cluster.start()
        result = run_async(_measure(cluster, layout, profile))
        result["populate_s"] = round(populate_s, 1)
        result["layout"] = {"small_keys": layout.small, "large_keys": layout.large,
                            "shards": layout.shards, "nodes": len(layout.cluster_shards)}
        return result
