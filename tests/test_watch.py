"""Watch, end to end through Prosody: semantics, resumption, failures, load."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable

import pytest
import watch_validators as check

from kvstore.client import Client, WatchStream
from kvstore.devcluster import DevCluster
from protocol.errors import Compacted, KvError, Unavailable
from protocol.model import Event, EventType


async def collect(stream: WatchStream, count: int, timeout: float = 20.0) -> list[Event]:
    """The next ``count`` events of ``stream`` (fails if they do not come in time)."""
    events: list[Event] = []

    async def read() -> None:
        async for event in stream:
            events.append(event)
            if len(events) >= count:
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        pytest.fail(f"got {len(events)} of {count} events in {timeout}s: {events[-3:]}")
    return events


async def test_watch_reports_puts_and_deletes_with_revisions(kv: Client, prefix: str) -> None:
    key = f"{prefix}/config"
    stream = kv.watch(key, prev_kv=True)
    await stream.start()
    first = await kv.put(key, b"v1")
    second = await kv.put(key, b"v2")
    gone = await kv.delete(key)
    events = await collect(stream, 3)
    await stream.close()
    assert [e.type for e in events] == [EventType.PUT, EventType.PUT, EventType.DELETE]
    assert [e.kv.value for e in events] == [b"v1", b"v2", b""]
    assert [e.rev for e in events] == [first.rev, second.rev, gone.revisions["/"]]
    assert [e.kv.version for e in events] == [1, 2, 0]
    assert events[1].prev is not None and events[1].prev.value == b"v1"
    assert events[2].prev is not None and events[2].prev.value == b"v2"


async def test_watch_of_a_key_ignores_its_neighbours(kv: Client, prefix: str) -> None:
    stream = kv.watch(f"{prefix}/a")
    await stream.start()
    await kv.put(f"{prefix}/ab", b"neighbour")
    await kv.put(f"{prefix}/a/child", b"child")
    await kv.put(f"{prefix}/a", b"mine")
    events = await collect(stream, 1)
    await stream.close()
    assert [e.key for e in events] == [f"{prefix}/a"]


async def test_prefix_watch_is_segment_wise(kv: Client, prefix: str) -> None:
    stream = kv.watch(f"{prefix}/ey04", prefix=True)
    await stream.start()
    await kv.put(f"{prefix}/ey040/x", b"not mine")
    await kv.put(f"{prefix}/ey04/slice/13", b"mine")
    await kv.put(f"{prefix}/ey04", b"mine too")
    events = await collect(stream, 2)
    await stream.close()
    assert [e.key for e in events] == [f"{prefix}/ey04/slice/13", f"{prefix}/ey04"]


async def test_watch_from_an_old_revision_replays_history_then_follows(
        kv: Client, prefix: str) -> None:
    written = [await kv.put(f"{prefix}/k{i}", str(i).encode()) for i in range(5)]
    stream = kv.watch(prefix, prefix=True, since=written[1].rev)
    await stream.start()
    later = await kv.put(f"{prefix}/k9", b"9")
    events = await collect(stream, 5)
    await stream.close()
    assert [e.rev for e in events] == [w.rev for w in written[1:]] + [later.rev]
    assert [e.kv.value for e in events] == [b"1", b"2", b"3", b"4", b"9"]


async def test_prefix_delete_arrives_as_one_atomic_revision(kv: Client, prefix: str) -> None:
    for i in range(50):
        await kv.put(f"{prefix}/d/{i}", b"x" * 100)
    stream = kv.watch(prefix, prefix=True)
    await stream.start()
    deleted = await kv.delete(f"{prefix}/d", prefix=True)
    marker = await kv.put(f"{prefix}/after", b"done")
    events = await collect(stream, 51)
    await stream.close()
    rev = deleted.revisions["/"]
    check.atomic(events, {("/", rev): 50})
    assert {e.rev for e in events[:50]} == {rev}
    assert events[-1].rev == marker.rev


async def test_a_revision_larger_than_one_stanza_still_arrives_whole(
        kv: Client, prefix: str) -> None:
    # 40 values of 100 KB: their deletion events with previous values span
    # many pushes, yet the application sees them as one revision.
    for i in range(40):
        await kv.put(f"{prefix}/big/{i:02d}", bytes([i]) * 100_000)
    stream = kv.watch(prefix, prefix=True, prev_kv=True)
    await stream.start()
    deleted = await kv.delete(f"{prefix}/big", prefix=True)
    events = await collect(stream, 40, timeout=30)
    await stream.close()
    assert {e.rev for e in events} == {deleted.revisions["/"]}
    assert sorted(e.prev.value[0] for e in events if e.prev) == list(range(40))


async def test_watch_spans_every_shard_of_the_subtree(kv: Client, prefix: str) -> None:
    stream = kv.watch("/", prefix=True)
    await stream.start()
    assert set(stream.revisions()) >= {"/", "/sharded"}
    on_root = await kv.put(f"{prefix}/x", b"root shard")
    on_second = await kv.put(f"/sharded{prefix}/x", b"second shard")
    events: list[Event] = []
    wanted = {(on_root.shard, on_root.rev), (on_second.shard, on_second.rev)}
    async with asyncio.timeout(20):
        async for event in stream:
            if (event.shard, event.rev) in wanted:
                events.append(event)
            if len(events) == 2:
                break
    assert {e.shard for e in events} == {"/", "/sharded"}


async def test_a_hundred_watchers_each_see_every_event(cluster: DevCluster, prefix: str) -> None:
    clients = [Client(cluster.settings()) for _ in range(4)]
    await asyncio.gather(*(c.connect() for c in clients))
    try:
        streams = [clients[i % 4].watch(prefix, prefix=True) for i in range(100)]
        await asyncio.gather(*(s.start() for s in streams))
        writer = clients[0]
        acked = []
        for i in range(20):
            result = await writer.put(f"{prefix}/k{i % 5}", str(i).encode())
            acked.append((result.shard, result.rev, f"{prefix}/k{i % 5}"))
        received = await asyncio.gather(*(collect(s, 20, timeout=60) for s in streams))
        for events in received:
            check.check_all(events, acked)
        await asyncio.gather(*(s.close() for s in streams))
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_a_compacted_start_is_refused_with_the_oldest_revision(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(node_settings={
        "storage": {"retain_revisions": 10, "compact_interval": 0.2},
    })
    async with Client(dev.settings()) as kv:
        for i in range(40):
            await kv.put("/c/k", str(i).encode())
        deadline = time.monotonic() + 10
        while (await kv.status())[0].shards[0].compact_rev == 0:
            assert time.monotonic() < deadline, "compaction never ran"
            await asyncio.sleep(0.2)
        compacted = (await kv.status())[0].shards[0].compact_rev
        with pytest.raises(Compacted) as raised:
            async for _ in kv.watch("/c/k", since=1):
                pass
        assert raised.value.compact_rev >= compacted
        # Reading afresh and watching from that read's revision works.
        snapshot = await kv.get_prefix("/c", limit=10)
        stream = kv.watch("/c", prefix=True, since=snapshot.next_revisions())
        await stream.start()
        after = await kv.put("/c/k", b"after")
        events = await collect(stream, 1)
        assert events[0].rev == after.rev
        await stream.close()


async def test_a_slow_watcher_is_cut_loose_and_resumes_without_a_gap(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster()
    async with Client(dev.settings()) as kv:
        stream = kv.watch("/slow", prefix=True)
        await stream.start()
        acked = []
        # The watcher reads nothing while 15,000 events pile up: more than the
        # node buffers for one watch (10,000), so it must cancel and let the
        # stream resume from the log.
        for start in range(0, 15_000, 500):
            results = await asyncio.gather(*(
                kv.put(f"/slow/k{i % 50}", str(i).encode()) for i in range(start, start + 500)
            ))
            acked.extend((r.shard, r.rev, f"/slow/k{i % 50}")
                         for i, r in zip(range(start, start + 500), results, strict=True))
        events = await collect(stream, 15_000, timeout=120)
        status = await kv.status()
        await stream.close()
    check.check_all(events, acked)
    assert stream.resubscriptions >= 2, "the node never cut the slow watcher loose"
    assert status[0].watchers <= 1


async def test_watch_fails_fast_when_the_owner_is_offline(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(shards=["/", "/b"])
    dev.kill_node("node2")
    async with Client(dev.settings()) as kv:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await kv.watch("/b/x").start()
        assert time.monotonic() - started < 2


async def test_a_stream_whose_node_stays_away_raises_instead_of_hanging(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster()
    async with Client(dev.settings()) as kv:
        stream = kv.watch("/gone", prefix=True, unavailable_timeout=1.0)
        await stream.start()
        dev.kill_node("node1")
        started = time.monotonic()
        with pytest.raises(Unavailable):
            async for _ in stream:
                pass
        assert time.monotonic() - started < 5


async def _write_through_faults(kv: Client, keys: list[str], count: int,
                                acked: list[tuple[str, int, str]]) -> None:
    """Write ``count`` values, retrying through outages; record what was acknowledged."""
    i = 0
    deadline = time.monotonic() + 60
    while i < count and time.monotonic() < deadline:
        key = keys[i % len(keys)]
        try:
            result = await kv.put(key, str(i).encode(), timeout=2)
        except KvError:
            await asyncio.sleep(0.05)
            continue
        acked.append((result.shard, result.rev, key))
        i += 1
        await asyncio.sleep(0.002)
    assert i == count, f"only {i} of {count} writes were acknowledged in time"


async def _stream_until(stream: WatchStream, acked: list[tuple[str, int, str]],
                        writer: asyncio.Task[None], timeout: float) -> list[Event]:
    """Everything the stream delivers until it holds every acknowledged write."""
    events: list[Event] = []

    async def read() -> None:
        async for event in stream:
            events.append(event)

    reader = asyncio.ensure_future(read())
    deadline = time.monotonic() + timeout
    try:
        while True:
            if reader.done():
                reader.result()  # the stream ended: raise what ended it
                pytest.fail("the stream ended early")
            if writer.done():
                seen = {(e.shard, e.rev, e.key) for e in events}
                if all(write in seen for write in acked):
                    return events
            assert time.monotonic() < deadline, (
                f"{len(events)} events, {len(acked)} acknowledged writes after {timeout}s"
            )
            await asyncio.sleep(0.1)
    finally:
        reader.cancel()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_stream_survives_a_storage_node_restart(
        make_cluster: Callable[..., DevCluster], how: str) -> None:
    dev = make_cluster(shards=["/", "/s"])
    async with Client(dev.settings()) as writer_client, Client(dev.settings()) as kv:
        stream = kv.watch("/", prefix=True, unavailable_timeout=30)
        await stream.start()
        acked: list[tuple[str, int, str]] = []
        writer = asyncio.ensure_future(
            _write_through_faults(writer_client, ["/r/a", "/r/b", "/s/c"], 300, acked))
        reader = asyncio.ensure_future(_stream_until(stream, acked, writer, 90))
        await asyncio.sleep(0.5)
        sig = signal.SIGTERM if how == "sigterm" else signal.SIGKILL
        for name in ("node2", "node1"):
            await asyncio.to_thread(dev.kill_node, name, sig)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(dev.start_node, name)
        await writer
        events = await reader
        await stream.close()
    check.check_all(events, acked)
    assert stream.resubscriptions >= 4


async def test_stream_survives_an_xmpp_server_restart(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(shards=["/", "/s"])
    async with Client(dev.settings()) as writer_client, Client(dev.settings()) as kv:
        stream = kv.watch("/", prefix=True, unavailable_timeout=30)
        await stream.start()
        acked: list[tuple[str, int, str]] = []
        writer = asyncio.ensure_future(
            _write_through_faults(writer_client, ["/r/a", "/s/b"], 300, acked))
        reader = asyncio.ensure_future(_stream_until(stream, acked, writer, 90))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(dev.prosody.restart)
        await writer
        events = await reader
        await stream.close()
    check.check_all(events, acked)
    assert stream.resubscriptions >= 3


async def test_resuming_from_the_last_revision_seen_continues_exactly(
        kv: Client, prefix: str) -> None:
    stream = kv.watch(prefix, prefix=True)
    await stream.start()
    for i in range(10):
        await kv.put(f"{prefix}/k", str(i).encode())
    first = await collect(stream, 5)
    await stream.close()
    resumed = kv.watch(prefix, prefix=True, since=first[-1].rev + 1)
    second = await collect(resumed, 5)
    await resumed.close()
    check.resumable(first, second)
    assert [e.kv.value for e in first + second] == [str(i).encode() for i in range(10)]


async def test_a_watcher_that_leaves_is_dropped_by_the_node(
        cluster: DevCluster, kv: Client, prefix: str) -> None:
    async def watchers_on_root() -> int:
        for node in await kv.status():
            if any(s.prefix == "/" for s in node.shards):
                return node.watchers
        raise AssertionError("no node serves /")

    before = await watchers_on_root()
    leaving = Client(cluster.settings())
    await leaving.connect()
    streams = [leaving.watch(f"{prefix}/{i}") for i in range(5)]
    await asyncio.gather(*(s.start() for s in streams))
    assert await watchers_on_root() == before + 5
    leaving.session.xmpp.abort()  # vanish without cancelling anything
    deadline = time.monotonic() + 5
    while await watchers_on_root() != before:
        assert time.monotonic() < deadline, "the node kept the departed watcher's watches"
        await asyncio.sleep(0.1)
    await leaving.close()


async def test_a_prefix_watch_takes_up_a_shard_whose_node_comes_online_later(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(shards=["/", "/b"])
    async with Client(dev.settings()) as kv:
        dev.kill_node("node2")  # seen once, offline now
        stream = kv.watch("/", prefix=True, unavailable_timeout=60)
        await stream.start()
        await asyncio.to_thread(dev.start_node, "node2")
        deadline = time.monotonic() + 10
        while True:
            try:
                written = await kv.put("/b/late", b"hello")
                break
            except KvError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        event = await stream.next(timeout=10)
        await stream.close()
    assert (event.shard, event.key, event.rev) == ("/b", "/b/late", written.rev)


async def test_an_idle_watch_is_bookmarked_by_progress_notices(kv: Client, prefix: str) -> None:
    stream = kv.watch(f"{prefix}/quiet")
    await stream.start()
    before = stream.revisions()["/"]
    elsewhere = await kv.put(f"{prefix}/busy", b"x")  # same shard, another key
    deadline = time.monotonic() + 15
    while stream.revisions()["/"] <= elsewhere.rev:
        assert time.monotonic() < deadline, "no progress notice moved the bookmark"
        with contextlib.suppress(TimeoutError):
            await stream.next(timeout=0.5)
    await stream.close()
    assert before <= elsewhere.rev < stream.revisions()["/"]


async def test_a_node_presence_while_a_watch_starts_does_not_subscribe_it_twice(
        kv: Client, prefix: str) -> None:
    """The presence of the key's node, handled after ``start()`` has queued its
    subscription and before it runs, must not start a second one (the node
    would keep the first watch for nothing, against the watcher's limit), nor
    move the new watch's start back to the revision the node announced."""
    sent: list[str] = []
    call = kv._call

    def counting_call(node, type_, payload, timeout):  # type: ignore[no-untyped-def]
        if getattr(payload, "name", None) == "watch":
            sent.append(payload.xml.get("id"))
        return call(node, type_, payload, timeout)

    await kv.put(f"{prefix}/k", b"before")  # older than the watch: not for it
    kv._call = counting_call  # type: ignore[method-assign]
    stream = kv.watch(f"{prefix}/k")
    node = kv.directory.owner(kv.directory.shard_of(f"{prefix}/k"))
    assert node is not None
    # Queued before start(), so it runs after start() queues its subscription.
    asyncio.get_running_loop().call_soon(kv.watches._on_node, node)
    await stream.start()
    await asyncio.sleep(0.2)  # a second subscription would have been sent by now
    assert len(sent) == 1
    assert [watch_id for watch_id, (owner, _) in kv.watches.routes.items()
            if owner is stream] == sent
    await kv.put(f"{prefix}/k", b"once")
    events = await collect(stream, 1)
    assert [e.kv.value for e in events] == [b"once"]
    await stream.close()


async def test_a_watch_follows_its_node_to_a_new_session_met_while_resubscribing(
        kv: Client, prefix: str) -> None:
    """The node comes back as a new session while the watch's request to its
    previous session is out: the watch takes up the new session, not stall."""
    key = f"{prefix}/k"
    stream = kv.watch(key)
    await stream.start()
    node = kv.directory.owner(kv.directory.shard_of(key))
    assert node is not None and node.jid is not None
    real = node.jid
    # The node "went" to a session that no longer exists: the stream resubscribes there...
    node.jid = real.split("/")[0] + "/a-session-gone-meanwhile"
    kv.watches._on_node(node)
    await asyncio.sleep(0)  # ...and its request is out
    # ...when the node is seen again at its session of now.
    node.jid = real
    kv.watches._on_node(node)
    await asyncio.sleep(0.5)
    await kv.put(key, b"after")
    events = await collect(stream, 1, timeout=5.0)
    assert [e.kv.value for e in events] == [b"after"]
    await stream.close()
