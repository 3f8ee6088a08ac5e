"""Transactions: compares, branches, one revision for all writes, one shard."""

from __future__ import annotations

import asyncio

import pytest
import watch_validators as check
from waits import until_deleted

from kvstore.client import Client, PutResult
from kvstore.devcluster import DevCluster
from protocol.errors import BadRequest, InvalidKey, KvError, ValueTooLarge
from protocol.model import Compare, Delete, EventType, Get, Put


async def test_success_branch_runs_when_every_compare_holds(kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/a", b"1")
    result = await kv.txn(
        [Compare(f"{prefix}/a", "version", "=", 1), Compare(f"{prefix}/new", "version", "=", 0)],
        [Put(f"{prefix}/a", b"2"), Put(f"{prefix}/new", b"n"), Get(f"{prefix}", prefix=True)],
        [Get(f"{prefix}/a")],
    )
    assert result.succeeded
    put_a, put_new, listing = result.results
    assert isinstance(put_a, PutResult) and put_a.mod_rev == result.rev and put_a.version == 2
    assert isinstance(put_new, PutResult) and put_new.create_rev == result.rev
    assert [(kv.key, kv.value) for kv in listing] == [(f"{prefix}/a", b"2"),
                                                       (f"{prefix}/new", b"n")]


async def test_failure_branch_runs_when_a_compare_fails_and_writes_nothing_else(
        kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/a", b"1")
    before = await kv.get(f"{prefix}/a")
    result = await kv.txn([Compare(f"{prefix}/a", "mod-rev", ">", before.mod_rev)],
                          [Put(f"{prefix}/a", b"never")], [Get(f"{prefix}/a")])
    assert not result.succeeded
    assert result.results == [[before]]
    assert (await kv.get(f"{prefix}/a")).value == b"1"


async def test_all_writes_share_one_revision_and_reach_watchers_together(
        kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/gone", b"x")
    stream = kv.watch(prefix, prefix=True)
    await stream.start()
    result = await kv.txn(success=[Put(f"{prefix}/{i}", str(i).encode()) for i in range(50)]
                          + [Delete(f"{prefix}/gone")])
    events = [await stream.next(timeout=10) for _ in range(51)]
    await stream.close()
    check.atomic(events, {("/", result.rev): 51})
    assert {e.rev for e in events} == {result.rev}
    assert events[-1].type is EventType.DELETE


async def test_a_compare_and_swap_counter_loses_no_increment(kv: Client, prefix: str) -> None:
    key = f"{prefix}/counter"
    await kv.put(key, b"0")

    async def increment() -> None:
        for _ in range(100):
            current = await kv.get(key)
            result = await kv.txn([Compare(key, "mod-rev", "=", current.mod_rev)],
                                  [Put(key, str(int(current.value) + 1).encode())])
            if result.succeeded:
                return
        raise AssertionError("100 tries without winning once")

    await asyncio.gather(*(increment() for _ in range(20)))
    assert (await kv.get(key)).value == b"20"


async def test_put_many_writes_everything_and_groups_by_shard(kv: Client, prefix: str) -> None:
    items = {f"{prefix}/k{i}": bytes([i % 256]) * 2000 for i in range(300)}
    items.update({f"/sharded{prefix}/k{i}": b"s" for i in range(10)})
    revisions = await kv.put_many(items)
    assert set(revisions) == {"/", "/sharded"}
    stored = (await kv.get_prefix(prefix)).items + (await kv.get_prefix(f"/sharded{prefix}")).items
    assert {item.key: item.value for item in stored} == items


async def test_put_many_ephemeral_binds_every_key_to_the_session(
        cluster: DevCluster, kv: Client, prefix: str) -> None:
    items = {f"{prefix}/a": b"1", f"{prefix}/b": b"2", f"/sharded{prefix}/c": b"3"}
    async with Client(cluster.settings(), resource="short-lived") as session:
        await session.put_many(items, ephemeral=True)
        for key in items:
            assert (await kv.get(key)).ephemeral
    # The session ended: the node deletes its keys after the grace period.
    for key in items:
        await until_deleted(kv, key, within=10.0)


async def test_bad_transactions_are_refused_and_change_nothing(kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/a", b"1")
    with pytest.raises(BadRequest, match="once"):
        await kv.txn(success=[Put(f"{prefix}/a", b"x"), Delete(f"{prefix}/a")])
    with pytest.raises(KvError, match="one shard"):
        await kv.txn(success=[Put(f"{prefix}/b", b"x"), Put(f"/sharded{prefix}/b", b"y")])
    with pytest.raises(InvalidKey):
        await kv.txn(success=[Put(f"{prefix}/../b", b"x")])
    with pytest.raises(ValueTooLarge):
        await kv.txn(success=[Put(f"{prefix}/b", bytes(200_000))])
    with pytest.raises(BadRequest):
        await kv.txn(success=[Put(f"{prefix}/{i}", b"") for i in range(1001)])
    assert [i.key for i in (await kv.get_prefix(prefix)).items] == [f"{prefix}/a"]
    assert (await kv.get(f"{prefix}/a")).version == 1
