"""Leases: keys that live while their holder refreshes them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from waits import until_deleted

from kvstore.client import Client
from kvstore.devcluster import DevCluster
from protocol.errors import BadRequest, Forbidden, KeyNotFound, LeaseNotFound
from protocol.model import EventType


async def test_a_refreshed_lease_keeps_its_keys_and_a_revoked_one_deletes_them(
        kv: Client, prefix: str) -> None:
    stream = kv.watch(prefix, prefix=True)
    await stream.start()
    async with kv.lease(ttl=2) as lease:
        await kv.put(f"{prefix}/a", b"1", lease=lease)
        await kv.put(f"/sharded{prefix}/b", b"2", lease=lease)  # a second node, same lease
        await asyncio.sleep(4)  # twice the ttl: only the keepalives keep them
        assert (await kv.get(f"{prefix}/a")).value == b"1"
        assert (await kv.get(f"/sharded{prefix}/b")).value == b"2"
    with pytest.raises(KeyNotFound):
        await kv.get(f"{prefix}/a")
    with pytest.raises(KeyNotFound):
        await kv.get(f"/sharded{prefix}/b")
    kinds = [(await stream.next(timeout=5)).type for _ in range(2)]
    await stream.close()
    assert kinds == [EventType.PUT, EventType.DELETE]


async def test_a_lease_nobody_refreshes_expires_with_its_keys(
        kv: Client, prefix: str) -> None:
    lease = kv.lease(ttl=1)
    await kv.put(f"{prefix}/job", b"running", lease=lease)
    assert lease._keeper is not None
    lease._keeper.cancel()  # the holder froze
    assert 0.5 < await until_deleted(kv, f"{prefix}/job", 5) < 3
    with pytest.raises(LeaseNotFound):
        await kv.put(f"{prefix}/again", b"x", lease=lease)


async def test_leases_survive_a_node_restart(make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster()
    async with Client(dev.settings()) as kv:
        lease = kv.lease(ttl=3)
        await kv.put("/l/a", b"1", lease=lease)
        await asyncio.to_thread(dev.restart_node, "node1")
        await asyncio.sleep(4)  # past the ttl: the keepalives after the restart count
        assert (await kv.get("/l/a")).value == b"1"
        assert await lease.revoke() == 1


async def test_only_the_grantor_uses_a_lease_and_bad_requests_are_refused(
        cluster: DevCluster, kv: Client, prefix: str) -> None:
    lease = kv.lease(ttl=5)
    await kv.put(f"{prefix}/mine", b"1", lease=lease)
    node = kv.directory.owner("/")
    assert node is not None
    async with Client(cluster.settings("lease-thief")) as thief:
        stolen = thief.lease(ttl=5)
        stolen.ids[node.bare] = lease.ids[node.bare]
        with pytest.raises(Forbidden):
            await thief.put(f"{prefix}/theirs", b"x", lease=stolen)
    with pytest.raises(BadRequest):
        await kv.put(f"{prefix}/both", b"x", lease=lease, ephemeral=True)
    await lease.revoke()
