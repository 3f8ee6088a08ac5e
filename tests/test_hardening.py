"""Limits and faults: a full store, floods from one JID, a frozen server."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import watch_validators as check

from kvstore.client import Client
from kvstore.devcluster import DevCluster
from protocol.errors import KvError, ResourceLimit, StorageFull
from protocol.model import Event


async def test_a_full_store_refuses_writes_clearly_and_keeps_serving_reads(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(node_settings={"storage": {"map_size": 2 * 1024 * 1024}})
    async with Client(dev.settings()) as kv:
        written: dict[str, bytes] = {}
        with pytest.raises(StorageFull, match="full"):
            for i in range(200):
                key, value = f"/fill/{i}", bytes([i % 256]) * 50_000
                await kv.put(key, value)
                written[key] = value
        assert written, "the map filled before a single write"
        # Reads still work and return exactly what was acknowledged.
        for key, value in written.items():
            assert (await kv.get(key)).value == value
        # Deleting makes room again (one key at a time: each needs little
        # room of its own): the node was never wedged.
        for key in written:
            await kv.delete(key)
        await kv.put("/after", b"room again")
    dev.restart_node("node1")
    async with Client(dev.settings()) as kv:
        assert (await kv.get("/after")).value == b"room again"


async def test_a_flood_of_watches_from_one_jid_is_capped(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(node_settings={"limits": {"max_watches": 20}})
    async with Client(dev.settings()) as kv:
        streams = [kv.watch(f"/w/{i}") for i in range(20)]
        await asyncio.gather(*(s.start() for s in streams))
        with pytest.raises(ResourceLimit):
            await kv.watch("/w/one-too-many").start()
        await streams[0].close()
        extra = kv.watch("/w/now-it-fits")
        await extra.start()  # a cancelled watch frees its place
        await extra.close()
        for stream in streams[1:]:
            await stream.close()


async def test_a_flood_of_writes_from_one_jid_is_capped_not_queued_forever(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(node_settings={"limits": {"max_in_flight": 8}})
    async with Client(dev.settings(timeout=10)) as kv:
        results = await asyncio.gather(*(kv.put(f"/flood/{i}", b"x" * 1000) for i in range(400)),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, ResourceLimit)]
        accepted = [r for r in results if not isinstance(r, BaseException)]
        assert refused, "400 concurrent writes never hit a limit of 8 in flight"
        assert all(isinstance(r, ResourceLimit) or not isinstance(r, BaseException)
                   for r in results)
        stored = (await kv.get_prefix("/flood", keys_only=True)).items
        assert len(stored) == len(accepted)


async def test_a_frozen_server_for_five_seconds_then_watches_resume_without_gaps(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(shards=["/", "/s"])
    async with Client(dev.settings(timeout=1)) as writer, \
            Client(dev.settings(timeout=1)) as watcher:
        stream = watcher.watch("/", prefix=True, unavailable_timeout=60)
        await stream.start()
        acked: list[tuple[str, int, str]] = []
        events: list[Event] = []

        async def read() -> None:
            async for event in stream:
                events.append(event)

        reader = asyncio.ensure_future(read())

        async def write(count: int) -> None:
            written = 0
            deadline = time.monotonic() + 60
            while written < count and time.monotonic() < deadline:
                key = f"/{'s/' if written % 2 else ''}k{written % 7}"
                try:
                    result = await writer.put(key, str(written).encode())
                except KvError:
                    await asyncio.sleep(0.1)
                    continue
                acked.append((result.shard, result.rev, key))
                written += 1

        await write(50)
        dev.prosody.pause()
        started = time.monotonic()
        try:
            outcome = await asyncio.gather(writer.get("/k1"), return_exceptions=True)
            assert isinstance(outcome[0], KvError)  # a timeout, not a hang
            assert time.monotonic() - started < 3
            await asyncio.sleep(5 - (time.monotonic() - started))
        finally:
            dev.prosody.resume()
        await write(50)
        deadline = time.monotonic() + 30
        while {(e.shard, e.rev, e.key) for e in events} < set(acked):
            assert time.monotonic() < deadline, f"{len(events)} events for {len(acked)} writes"
            await asyncio.sleep(0.1)
        reader.cancel()
    check.check_all(events, acked)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of its own (tmpfs); skipped where mounting is not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                              str(mount_point)], capture_output=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


async def test_a_full_disk_refuses_writes_clearly_and_keeps_serving_reads(
        make_cluster: Callable[..., DevCluster], small_disk: Path) -> None:
    dev = make_cluster(node_settings={
        "node": {"data_dir": str(small_disk / "data")},
        "storage": {"map_size": 64 * 1024 * 1024},  # far more than the disk holds
    })
    written: dict[str, bytes] = {}
    async with Client(dev.settings()) as kv:
        with pytest.raises(StorageFull, match="disk is full"):
            for i in range(400):
                key, value = f"/disk/{i}", bytes([i % 256]) * 20_000
                await kv.put(key, value)
                written[key] = value
        assert written
        for key, value in written.items():
            assert (await kv.get(key)).value == value
    dev.stop()
    dev.start()
    async with Client(dev.settings()) as kv:
        stored = {item.key: item.value for item in (await kv.get_prefix("/disk")).items}
    assert stored == written
