"""The async client against the real cluster: data model, compares, ranges, routing.

Everything here talks to the session cluster (node1 owns ``/``, node2 owns
``/sharded``) through Prosody. Keys stay under the test's own ``prefix``, or
under ``/sharded/<unique>`` for the second shard; the two tests that need
whole-namespace reads build a private cluster.
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from kvstore.client import Client
from kvstore.devcluster import DevCluster
from kvstore.directory import HARD_VALUE_LIMIT
from kvstore.sync import SyncClient
from protocol import keys
from protocol import stanza as wire
from protocol.errors import (
    InvalidKey,
    KeyNotFound,
    NotOwner,
    ValueTooLarge,
    VersionMismatch,
)

NODE_VALUE_LIMIT = 128 * 1024
"""The default ``limits.max_value_bytes`` of a storage node."""


@pytest_asyncio.fixture(autouse=True)
async def _collect_sessions() -> AsyncIterator[None]:
    """Collect the test's closed XMPP sessions while their event loop is still open.

    Left to a later garbage collection, slixmpp's finalizers run on a closed
    loop and raise from inside whatever code happens to be running then.
    """
    yield
    gc.collect()
    await asyncio.sleep(0)


@pytest.fixture
def sharded() -> str:
    """A unique key prefix inside the second shard (owned by node2)."""
    return f"/sharded/t-{uuid.uuid4().hex[:8]}"


async def shard_revisions(kv: Client) -> dict[str, int]:
    """Shard -> current revision, as the nodes report it."""
    revs: dict[str, int] = {}
    for node in await kv.status():
        for shard in node.shards:
            revs[shard.prefix] = shard.rev
    return revs


def tree_sorted(names: list[str]) -> list[str]:
    return sorted(names, key=keys.tree_order)


# --- values ---------------------------------------------------------------------

VALUES: dict[str, bytes | str] = {
    "empty": b"",
    "one-byte": b"x",
    "nul-and-high-bytes": b"\x00\xff\xfe\x80\x00",
    "invalid-utf8": b"\xc3\x28\xa0\xa1\xe2\x28\xa1",
    "all-bytes": bytes(range(256)),
    "whitespace-only": b"  \n\t\r\n ",
    "xml-specials": b"<a href='x'>&amp;</a>]]>",
    "str-unicode": "h\u00e9llo \u2713 \U0001f600",
    "base64-lookalike": b"dGVzdA==",
    "medium-random": os.urandom(10_000),
}


@pytest.mark.parametrize("name", list(VALUES))
async def test_put_get_round_trip(kv: Client, prefix: str, name: str) -> None:
    value = VALUES[name]
    expected = value.encode("utf-8") if isinstance(value, str) else value
    written = await kv.put(f"{prefix}/v", value)
    item = await kv.get(f"{prefix}/v")
    assert item.key == f"{prefix}/v"
    assert item.value == expected
    assert isinstance(item.value, bytes)
    assert item.version == 1
    assert item.mod_rev == item.create_rev == written.rev == written.mod_rev


async def test_round_trip_in_second_shard(kv: Client, sharded: str) -> None:
    value = os.urandom(300)
    written = await kv.put(f"{sharded}/bin", value)
    assert written.shard == "/sharded"
    assert (await kv.get(f"{sharded}/bin")).value == value


async def test_value_at_the_node_limit_round_trips(kv: Client, prefix: str) -> None:
    _, node = kv.directory.route(f"{prefix}/big")
    assert node.max_value == NODE_VALUE_LIMIT
    value = os.urandom(NODE_VALUE_LIMIT)
    await kv.put(f"{prefix}/big", value)
    assert (await kv.get(f"{prefix}/big")).value == value
    page = await kv.get_prefix(prefix)
    assert [item.value for item in page.items] == [value]


async def test_one_byte_over_the_limit_is_refused_and_client_keeps_working(
        kv: Client, prefix: str) -> None:
    with pytest.raises(ValueTooLarge):
        await kv.put(f"{prefix}/big", b"a" * (NODE_VALUE_LIMIT + 1))
    with pytest.raises(KeyNotFound):
        await kv.get(f"{prefix}/big")
    assert kv.session.online.is_set()
    written = await kv.put(f"{prefix}/after", b"still here")
    assert (await kv.get(f"{prefix}/after")).value == b"still here"
    assert written.version == 1


async def test_node_refuses_oversize_value_the_client_let_through(
        kv: Client, prefix: str) -> None:
    """If the client's idea of the limit is wrong, the node still refuses, and stays up."""
    _, node = kv.directory.route(f"{prefix}/big")
    node.max_value = HARD_VALUE_LIMIT  # pretend the node allows more than it does
    for size in (NODE_VALUE_LIMIT + 1, HARD_VALUE_LIMIT):
        with pytest.raises(ValueTooLarge) as caught:
            await kv.put(f"{prefix}/big", os.urandom(size))
        assert caught.value.details.get("limit") == str(NODE_VALUE_LIMIT)
    with pytest.raises(KeyNotFound):
        await kv.get(f"{prefix}/big")
    assert kv.session.online.is_set()
    await kv.put(f"{prefix}/ok", b"1")
    assert (await kv.get(f"{prefix}/ok")).value == b"1"


# --- revisions ------------------------------------------------------------------


async def test_revisions_follow_etcd_semantics(kv: Client, prefix: str) -> None:
    key = f"{prefix}/k"
    first = await kv.put(key, b"1")
    assert first.shard == "/"
    assert (first.version, first.create_rev, first.mod_rev) == (1, first.rev, first.rev)

    second = await kv.put(key, b"2")
    assert second.rev == first.rev + 1  # nobody else writes to the shard meanwhile
    assert (second.version, second.create_rev, second.mod_rev) == (2, first.rev, second.rev)

    other = await kv.put(f"{prefix}/other", b"x")
    assert other.rev == second.rev + 1
    item = await kv.get(key)
    assert (item.version, item.create_rev, item.mod_rev) == (2, first.rev, second.rev)

    third = await kv.put(key, b"3")
    assert (third.version, third.create_rev, third.mod_rev) == (3, first.rev, other.rev + 1)

    deleted = await kv.delete(key)
    assert deleted.deleted == 1
    assert deleted.revisions == {"/": third.rev + 1}
    with pytest.raises(KeyNotFound):
        await kv.get(key)

    again = await kv.put(key, b"4")
    assert again.rev == third.rev + 2
    assert (again.version, again.create_rev, again.mod_rev) == (1, again.rev, again.rev)
    assert (await shard_revisions(kv))["/"] == again.rev


async def test_failed_writes_do_not_advance_the_revision(kv: Client, prefix: str,
                                                         sharded: str) -> None:
    written = await kv.put(f"{prefix}/k", b"1")
    before = await shard_revisions(kv)
    assert before["/"] == written.rev
    with pytest.raises(VersionMismatch):
        await kv.put(f"{prefix}/k", b"2", if_version=7)
    with pytest.raises(KeyNotFound):
        await kv.delete(f"{prefix}/missing")
    with pytest.raises(KeyNotFound):
        await kv.delete(f"{sharded}/missing")
    gone = await kv.delete(f"{prefix}/nothing-here", prefix=True)
    assert (gone.deleted, gone.revisions) == (0, {})
    assert await shard_revisions(kv) == before


async def test_revisions_are_per_shard(kv: Client, prefix: str, sharded: str) -> None:
    before = await shard_revisions(kv)
    assert set(before) == {"/", "/sharded"}
    written = await kv.put(f"{sharded}/a", b"1")
    assert written.shard == "/sharded"
    assert written.rev == before["/sharded"] + 1
    after = await shard_revisions(kv)
    assert after == {"/": before["/"], "/sharded": before["/sharded"] + 1}
    local = await kv.put(f"{prefix}/a", b"1")
    assert local.rev == before["/"] + 1
    assert (await shard_revisions(kv)) == {"/": before["/"] + 1, "/sharded": written.rev}


# --- compares -------------------------------------------------------------------


async def test_if_version_zero_creates_only_if_absent(kv: Client, prefix: str) -> None:
    key = f"{prefix}/once"
    created = await kv.put(key, b"first", if_version=0)
    assert created.version == 1
    with pytest.raises(VersionMismatch) as caught:
        await kv.put(key, b"second", if_version=0)
    assert caught.value.current_version == 1
    assert caught.value.current_mod_rev == created.mod_rev
    item = await kv.get(key)
    assert (item.value, item.version) == (b"first", 1)

    await kv.delete(key)
    recreated = await kv.put(key, b"third", if_version=0)
    assert (recreated.version, recreated.create_rev) == (1, recreated.rev)


async def test_if_version_compare(kv: Client, prefix: str) -> None:
    key = f"{prefix}/cas"
    await kv.put(key, b"v1")
    updated = await kv.put(key, b"v2", if_version=1)
    assert updated.version == 2
    with pytest.raises(VersionMismatch) as caught:
        await kv.put(key, b"stale", if_version=1)
    assert caught.value.current_version == 2
    assert caught.value.current_mod_rev == updated.mod_rev
    assert (await kv.get(key)).value == b"v2"

    with pytest.raises(VersionMismatch) as missing:
        await kv.put(f"{prefix}/absent", b"x", if_version=3)
    assert missing.value.current_version == 0
    with pytest.raises(KeyNotFound):
        await kv.get(f"{prefix}/absent")


async def test_if_mod_rev_compare(kv: Client, prefix: str, sharded: str) -> None:
    for key in (f"{prefix}/m", f"{sharded}/m"):
        first = await kv.put(key, b"a")
        second = await kv.put(key, b"b", if_mod_rev=first.mod_rev)
        assert second.version == 2
        with pytest.raises(VersionMismatch) as caught:
            await kv.put(key, b"c", if_mod_rev=first.mod_rev)
        assert caught.value.current_version == 2
        assert caught.value.current_mod_rev == second.mod_rev
        assert (await kv.get(key)).value == b"b"


async def test_if_mod_rev_zero_means_absent(kv: Client, prefix: str) -> None:
    key = f"{prefix}/fresh"
    created = await kv.put(key, b"1", if_mod_rev=0)
    assert created.version == 1
    with pytest.raises(VersionMismatch) as caught:
        await kv.put(key, b"2", if_mod_rev=0)
    assert caught.value.current_mod_rev == created.mod_rev
    assert (await kv.get(key)).value == b"1"


async def test_concurrent_creates_exactly_one_wins(kv: Client, cluster: DevCluster,
                                                   prefix: str) -> None:
    key = f"{prefix}/race"
    async with Client(cluster.settings()) as other:
        attempts = [client.put(key, f"writer{i}".encode(), if_version=0)
                    for i in range(20) for client in (kv, other)]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, VersionMismatch) and o.current_version == 1 for o in losers)
    item = await kv.get(key)
    assert item.version == 1
    assert item.mod_rev == winners[0].rev


async def test_compare_and_swap_counter_under_contention(kv: Client, cluster: DevCluster,
                                                         prefix: str) -> None:
    """Writers increment a counter with if_version; no increment is lost."""
    key = f"{prefix}/counter"
    await kv.put(key, b"0")

    async def increment(client: Client, times: int) -> int:
        conflicts = 0
        done = 0
        for _ in range(times * 50):  # bounded: each try either lands or conflicts
            if done == times:
                break
            item = await client.get(key)
            try:
                await client.put(key, str(int(item.value) + 1).encode(),
                                 if_version=item.version)
                done += 1
            except VersionMismatch:
                conflicts += 1
        assert done == times
        return conflicts

    async with Client(cluster.settings()) as other:
        await asyncio.gather(*(increment(client, 15) for client in (kv, other, kv, other)))
    item = await kv.get(key)
    assert item.value == b"60"
    assert item.version == 61


async def test_delete_with_compares(kv: Client, prefix: str) -> None:
    key = f"{prefix}/d"
    written = await kv.put(key, b"a")
    with pytest.raises(VersionMismatch) as caught:
        await kv.delete(key, if_version=2)
    assert caught.value.current_version == 1
    with pytest.raises(VersionMismatch):
        await kv.delete(key, if_mod_rev=written.mod_rev + 1000)
    assert (await kv.get(key)).value == b"a"
    result = await kv.delete(key, if_version=1, if_mod_rev=written.mod_rev)
    assert result.deleted == 1


# --- deletes ----------------------------------------------------------------------


async def test_delete_missing_key_raises_key_not_found(kv: Client, prefix: str,
                                                       sharded: str) -> None:
    with pytest.raises(KeyNotFound):
        await kv.delete(f"{prefix}/never")
    with pytest.raises(KeyNotFound):
        await kv.delete(f"{sharded}/never")
    await kv.put(f"{prefix}/once", b"x")
    await kv.delete(f"{prefix}/once")
    with pytest.raises(KeyNotFound):
        await kv.delete(f"{prefix}/once")


async def test_prefix_delete_is_segment_wise(kv: Client, prefix: str) -> None:
    doomed = [f"{prefix}/x/a", f"{prefix}/x/a/b", f"{prefix}/x/a/b/c"]
    kept = [f"{prefix}/x/ab", f"{prefix}/x/a-b", f"{prefix}/x/a.b", f"{prefix}/x",
            f"{prefix}/x/b/a"]
    for key in doomed + kept:
        await kv.put(key, key.encode())
    result = await kv.delete(f"{prefix}/x/a", prefix=True)
    assert result.deleted == len(doomed)
    assert list(result.revisions) == ["/"]
    remaining = await kv.get_prefix(prefix)
    assert [item.key for item in remaining.items] == tree_sorted(kept)
    for key in doomed:
        with pytest.raises(KeyNotFound):
            await kv.get(key)


async def test_prefix_delete_of_a_leaf_and_of_nothing(kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/leaf", b"1")
    await kv.put(f"{prefix}/leafy", b"2")
    result = await kv.delete(f"{prefix}/leaf", prefix=True)
    assert result.deleted == 1
    assert (await kv.get(f"{prefix}/leafy")).value == b"2"
    nothing = await kv.delete(f"{prefix}/leaf", prefix=True)
    assert nothing.deleted == 0


async def test_prefix_delete_in_second_shard_is_one_revision(kv: Client, sharded: str) -> None:
    for name in ("a", "a/b", "a/c", "ab"):
        await kv.put(f"{sharded}/{name}", b"x")
    before = await shard_revisions(kv)
    result = await kv.delete(f"{sharded}/a", prefix=True)
    assert result.deleted == 3
    assert result.revisions == {"/sharded": before["/sharded"] + 1}
    left = await kv.get_prefix(sharded)
    assert [item.key for item in left.items] == [f"{sharded}/ab"]


# --- ranges ---------------------------------------------------------------------


async def test_get_prefix_in_tree_order_with_limit_and_more(kv: Client, prefix: str) -> None:
    names = ["a", "a/b", "a/b/c", "a/b-c", "a/bc", "a-b", "a0", "b", "B", "a/b/c/d",
             "\u00e9t\u00e9", "z/y/x"]
    for name in names:
        await kv.put(f"{prefix}/{name}", name.encode())
    expected = [f"{prefix}/{name}" for name in
                ["B", "a", "a/b", "a/b/c", "a/b/c/d", "a/b-c", "a/bc", "a-b", "a0", "b",
                 "z/y/x", "\u00e9t\u00e9"]]
    everything = await kv.get_prefix(prefix)
    assert [item.key for item in everything.items] == expected
    assert [item.value for item in everything.items] == [
        key[len(prefix) + 1:].encode() for key in expected]
    assert everything.more is False
    assert list(everything.revisions) == ["/"]
    assert everything.revisions["/"] == (await shard_revisions(kv))["/"]

    first = await kv.get_prefix(prefix, limit=4)
    assert [item.key for item in first.items] == expected[:4]
    assert first.more is True
    exact = await kv.get_prefix(prefix, limit=len(expected))
    assert [item.key for item in exact.items] == expected
    assert exact.more is False

    # Resume after the last key of a page: the pages join up with no gap or repeat.
    pages: list[str] = []
    cursor = None
    for _ in range(20):
        page = await kv.get_prefix(prefix, limit=5, after=cursor)
        pages.extend(item.key for item in page.items)
        if not page.more:
            break
        cursor = page.items[-1].key
    assert pages == expected

    sub = await kv.get_prefix(f"{prefix}/a/b")
    assert [item.key for item in sub.items] == expected[2:5]
    keys_only = await kv.get_prefix(f"{prefix}/a", keys_only=True)
    assert [item.key for item in keys_only.items] == expected[1:7]
    assert all(item.value == b"" for item in keys_only.items)
    assert all(item.version == 1 for item in keys_only.items)


async def test_get_prefix_of_a_missing_subtree_is_empty(kv: Client, prefix: str) -> None:
    result = await kv.get_prefix(f"{prefix}/nothing")
    assert result.items == []
    assert result.more is False
    assert (await kv.list(f"{prefix}/nothing")).names == []


async def test_get_prefix_and_list_of_root_span_both_shards(kv: Client, prefix: str,
                                                            sharded: str) -> None:
    await kv.put(f"{prefix}/mine", b"1")
    await kv.put(f"{sharded}/theirs", b"2")
    everything = await kv.get_prefix("/", keys_only=True)
    found = [item.key for item in everything.items]
    assert found == tree_sorted(found)
    assert f"{prefix}/mine" in found
    assert f"{sharded}/theirs" in found
    assert set(everything.revisions) == {"/", "/sharded"}
    assert everything.revisions == await shard_revisions(kv)

    top = await kv.list("/")
    assert "t" in top.names
    assert "sharded" in top.names
    assert top.names == sorted(top.names, key=str.encode)
    assert set(top.revisions) == {"/", "/sharded"}


async def test_root_reads_merge_both_shards_exactly(
        make_cluster: Callable[..., DevCluster]) -> None:
    """A private cluster: the whole namespace is known, so results can be exact."""
    dev = make_cluster(shards=["/", "/sharded"])
    async with Client(dev.settings()) as kv:
        layout = {
            "/a": "/", "/a/b": "/", "/sharded": "/sharded", "/sharded/a": "/sharded",
            "/sharded/a/b": "/sharded", "/sharded-x": "/", "/shardedx/a": "/",
            "/s": "/", "/z": "/", "/sharded/z": "/sharded",
        }
        for key, shard in layout.items():
            written = await kv.put(key, key.encode())
            assert written.shard == shard, key
        expected = tree_sorted(list(layout))
        assert expected.index("/sharded/z") < expected.index("/sharded-x")

        result = await kv.get_prefix("/")
        assert [item.key for item in result.items] == expected
        assert [item.value for item in result.items] == [key.encode() for key in expected]
        assert result.revisions == {"/": 6, "/sharded": 4}
        assert result.more is False

        limited = await kv.get_prefix("/", limit=5)
        assert [item.key for item in limited.items] == expected[:5]
        assert limited.more is True

        listed = await kv.list("/")
        assert listed.names == ["a", "s", "sharded", "sharded-x", "shardedx", "z"]
        assert listed.revisions == {"/": 6, "/sharded": 4}
        paged = await kv.list("/", limit=3)
        assert paged.names == ["a", "s", "sharded"]
        assert paged.more is True

        shard_only = await kv.get_prefix("/sharded")
        assert [item.key for item in shard_only.items] == [
            "/sharded", "/sharded/a", "/sharded/a/b", "/sharded/z"]
        assert list(shard_only.revisions) == ["/sharded"]

        gone = await kv.delete("/", prefix=True)
        assert gone.deleted == len(layout)
        assert gone.revisions == {"/": 7, "/sharded": 5}
        assert (await kv.get_prefix("/")).items == []
        assert (await kv.list("/")).names == []


async def test_list_pagination_over_thousands_of_children(kv: Client, prefix: str) -> None:
    directory = f"{prefix}/dir"
    names = [f"c{i}" for i in range(2500)] + ["\u00e9", "Z", "a-b", "a.b"]
    gate = asyncio.Semaphore(64)

    async def put(name: str) -> None:
        async with gate:
            await kv.put(f"{directory}/{name}", name.encode())

    await asyncio.gather(*(put(name) for name in names))
    # A child that only has a subtree counts once, as does one with both.
    await kv.put(f"{directory}/c7/deeper", b"x")
    await kv.put(f"{directory}/only-below/x", b"y")
    await kv.put(f"{prefix}/dir-sibling/x", b"z")
    expected = sorted([*names, "only-below"], key=str.encode)

    full = await kv.list(directory)
    assert full.names == expected
    assert full.more is False

    collected: list[str] = []
    cursor = None
    for _ in range(100):
        page = await kv.list(directory, limit=333, after=cursor)
        assert len(page.names) <= 333
        collected.extend(page.names)
        if not page.more:
            break
        cursor = page.names[-1]
    else:
        pytest.fail("pagination did not end")
    assert collected == expected

    everything = await kv.get_prefix(directory, keys_only=True)
    assert len(everything.items) == len(names) + 2
    found = [item.key for item in everything.items]
    assert found == tree_sorted(found)
    assert everything.more is False
    limited = await kv.get_prefix(directory, limit=1500, keys_only=True)
    assert [item.key for item in limited.items] == found[:1500]
    assert limited.more is True


async def put_all(kv: Client, items: dict[str, bytes], width: int = 64) -> None:
    gate = asyncio.Semaphore(width)

    async def put(key: str, value: bytes) -> None:
        async with gate:
            await kv.put(key, value)

    await asyncio.gather(*(put(key, value) for key, value in items.items()))


def long_names(parent: str, count: int) -> list[str]:
    """Child names that fill the node's whole 500-byte key budget, with characters
    XML must escape."""
    width = 500 - len(parent) - 1
    return [(f"{i:04d}&<>\"" + "n" * width)[:width] for i in range(count)]


async def test_list_of_long_child_names_fits_in_stanzas(
        make_cluster: Callable[..., DevCluster]) -> None:
    """A page of names must stay under the server's 256 KiB stanza cap.

    700 names of 497 bytes are some 350 KB: one 1000-name page would be over
    the cap, and the server cuts off a client (here the node) that sends one.
    A private cluster, so that if it happens no other test loses node1.
    """
    dev = make_cluster(shards=["/"])
    async with Client(dev.settings()) as kv:
        names = long_names("/d", 700)
        await put_all(kv, {f"/d/{name}": b"" for name in names})
        listed = await kv.list("/d")
        assert listed.names == sorted(names, key=str.encode)
        assert all(node.online for node in await kv.status())


async def test_pages_of_long_keys_and_big_values_fit_in_stanzas(
        make_cluster: Callable[..., DevCluster]) -> None:
    """get_prefix pages are cut by their size on the wire (escaped keys, base64 values)."""
    dev = make_cluster(shards=["/"])
    async with Client(dev.settings()) as kv:
        names = long_names("/d", 700)
        await put_all(kv, {f"/d/{name}": b"" for name in names})
        keys_only = await kv.get_prefix("/d", keys_only=True)
        assert [item.key for item in keys_only.items] == tree_sorted(
            [f"/d/{name}" for name in names])

        big = {f"/v/{i:02d}": os.urandom(size)
               for i, size in enumerate([66_000] * 8 + [NODE_VALUE_LIMIT] * 3 + [1] * 5)}
        await put_all(kv, big)
        everything = await kv.get_prefix("/v")
        assert {item.key: item.value for item in everything.items} == big
        assert [item.key for item in everything.items] == sorted(big)
        assert all(node.online for node in await kv.status())


# --- keys -----------------------------------------------------------------------

BAD_KEYS: list[object] = [
    "", "a", "a/b", "/a/", "//a", "/a//b", "/a/./b", "/a/../b", "/..", "/.",
    "/a\x00b", "/a\nb", "/a\x7fb", "/a\x85b", "/a\ud800", "/" + "x" * 600,
    "/a" * 300, b"/a", None, 5,
]


async def test_invalid_keys_raise_before_anything_is_sent(
        kv: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[object] = []
    original = kv.session.xmpp.send

    def record(stanza: object, *args: object, **kwargs: object) -> None:
        sent.append(stanza)
        original(stanza, *args, **kwargs)

    monkeypatch.setattr(kv.session.xmpp, "send", record)
    for key in BAD_KEYS:
        with pytest.raises(InvalidKey):
            await kv.get(key)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            await kv.put(key, b"x")  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            await kv.delete(key)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            await kv.get_prefix(key)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            await kv.list(key)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            await kv.delete(key, prefix=True)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            kv.watch(key)  # type: ignore[arg-type]
    # The root names the whole namespace but holds no value of its own.
    with pytest.raises(InvalidKey):
        await kv.get("/")
    with pytest.raises(InvalidKey):
        await kv.put("/", b"x")
    with pytest.raises(InvalidKey):
        await kv.delete("/")
    assert sent == []


async def test_keys_with_unusual_characters_round_trip(kv: Client, prefix: str) -> None:
    names = ["a&b", "<tag>", "quote'\"", "sp ace", "pct%20", "\u00e9\u00e8", "\U0001f600",
             "...", "a.", ".a", "-", "x=y;z", "\u4e2d\u6587", "back\\slash"]
    for name in names:
        await kv.put(f"{prefix}/{name}", name.encode())
    for name in names:
        assert (await kv.get(f"{prefix}/{name}")).value == name.encode()
    listed = await kv.list(prefix)
    assert listed.names == sorted(names, key=str.encode)
    everything = await kv.get_prefix(prefix)
    assert [item.key for item in everything.items] == tree_sorted(
        [f"{prefix}/{name}" for name in names])


async def test_key_over_the_node_limit_is_refused_by_the_node(kv: Client, prefix: str) -> None:
    """The client only checks syntax (511 bytes); the node enforces its own 500."""
    key = prefix + "/" + "k" * (501 - len(prefix) - 1)
    assert len(key.encode()) == 501
    with pytest.raises(InvalidKey):
        await kv.put(key, b"x")
    with pytest.raises(InvalidKey):
        await kv.get(key)
    fits = key[:-1]
    await kv.put(fits, b"ok")
    assert (await kv.get(fits)).value == b"ok"

    too_deep = prefix + "/d" * 40  # the client allows 255 segments, the node 32
    with pytest.raises(InvalidKey):
        await kv.put(too_deep, b"x")
    assert (await kv.get_prefix(prefix)).items[0].key == fits


# --- routing --------------------------------------------------------------------


async def test_wrong_shard_is_answered_not_owner(kv: Client, cluster: DevCluster,
                                                 sharded: str, prefix: str) -> None:
    node1, node2 = cluster.nodes["node1"].jid, cluster.nodes["node2"].jid

    async def ask(to: str, key: str, shard: str | None) -> None:
        request = wire.Get()
        request.set_attrs(key=key, shard=shard)
        await kv.session.request(kv.session.iq(to, "get", request.xml), 5)

    for shard in ("/", "/sharded", None):
        with pytest.raises(NotOwner) as caught:
            await ask(node1, f"{sharded}/k", shard)
        assert caught.value.shard == "/sharded"

    with pytest.raises(NotOwner) as reverse:
        await ask(node2, f"{prefix}/k", "/sharded")
    assert reverse.value.shard == "/"

    put = wire.Put()
    put.set_attrs(key=f"{sharded}/k", shard="/")
    put.value = b"misrouted"
    with pytest.raises(NotOwner):
        await kv.session.request(kv.session.iq(node1, "set", put.xml), 5)

    # Nothing was written by the refused put, and the client itself routes right.
    with pytest.raises(KeyNotFound):
        await kv.get(f"{sharded}/k")
    written = await kv.put(f"{sharded}/k", b"routed")
    assert written.shard == "/sharded"
    assert (await kv.get(f"{sharded}/k")).value == b"routed"
    await ask(node2, f"{sharded}/k", "/sharded")


async def test_client_follows_not_owner_hint(kv: Client, sharded: str) -> None:
    """A client that has not heard of /sharded asks node1, which points it to node2."""
    kv.directory.known_shards.discard("/sharded")
    written = await kv.put(f"{sharded}/k", b"v")
    assert written.shard == "/sharded"
    assert "/sharded" in kv.directory.known_shards
    kv.directory.known_shards.discard("/sharded")
    assert (await kv.get(f"{sharded}/k")).value == b"v"
    kv.directory.known_shards.discard("/sharded")
    assert [item.key for item in (await kv.get_prefix(sharded)).items] == [f"{sharded}/k"]
    kv.directory.known_shards.discard("/sharded")
    assert (await kv.list(sharded)).names == ["k"]
    kv.directory.known_shards.discard("/sharded")
    assert (await kv.delete(sharded, prefix=True)).deleted == 1


async def test_segment_wise_routing(kv: Client, prefix: str) -> None:
    name = uuid.uuid4().hex[:8]
    assert kv.directory.route(f"/sharded/{name}")[0] == "/sharded"
    assert kv.directory.route(f"/sharded{name}/x")[0] == "/"
    assert kv.directory.route("/sharded")[0] == "/sharded"
    assert kv.directory.route(f"{prefix}/sharded")[0] == "/"


# --- status ---------------------------------------------------------------------


async def test_status_lists_both_nodes_with_their_shards(kv: Client, cluster: DevCluster,
                                                         sharded: str) -> None:
    written = await kv.put(f"{sharded}/s", b"1")
    nodes = await kv.status()
    assert len(nodes) == 2
    by_jid = {node.jid: node for node in nodes}
    assert set(by_jid) == {cluster.nodes["node1"].jid, cluster.nodes["node2"].jid}
    node1, node2 = by_jid[cluster.nodes["node1"].jid], by_jid[cluster.nodes["node2"].jid]
    assert node1.online and node2.online
    assert [shard.prefix for shard in node1.shards] == ["/"]
    assert [shard.prefix for shard in node2.shards] == ["/sharded"]
    assert node2.shards[0].rev == written.rev
    assert node2.shards[0].keys >= 1
    assert node1.uptime > 0 and node2.uptime > 0


# --- the synchronous facade -----------------------------------------------------


def test_sync_client_basic_operations(cluster: DevCluster) -> None:
    base = f"/t/sync-{uuid.uuid4().hex[:8]}"
    sharded = f"/sharded/sync-{uuid.uuid4().hex[:8]}"
    with SyncClient(cluster.settings()) as kv:
        first = kv.put(f"{base}/a", b"\xff\x00")
        assert first.version == 1
        assert kv.get(f"{base}/a").value == b"\xff\x00"
        second = kv.put(f"{base}/a", "text", if_version=1)
        assert second.version == 2
        with pytest.raises(VersionMismatch) as caught:
            kv.put(f"{base}/a", b"x", if_version=1)
        assert caught.value.current_version == 2
        kv.put(f"{base}/b/c", b"2")
        kv.put(f"{sharded}/z", b"3")
        assert [item.key for item in kv.get_prefix(base).items] == [f"{base}/a", f"{base}/b/c"]
        assert kv.list(base).names == ["a", "b"]
        assert kv.get(f"{sharded}/z").value == b"3"
        assert kv.delete(f"{base}/a").deleted == 1
        with pytest.raises(KeyNotFound):
            kv.get(f"{base}/a")
        with pytest.raises(KeyNotFound):
            kv.delete(f"{base}/a")
        with pytest.raises(InvalidKey):
            kv.get("no-slash")
        assert kv.delete(base, prefix=True).deleted == 1
        assert kv.get_prefix(base).items == []
        assert {node.jid for node in kv.status() if node.online} == {
            cluster.nodes["node1"].jid, cluster.nodes["node2"].jid}


def test_sync_client_watch(cluster: DevCluster) -> None:
    base = f"/t/sync-watch-{uuid.uuid4().hex[:8]}"
    with SyncClient(cluster.settings()) as kv:
        first = kv.put(f"{base}/a", b"1")
        kv.put(f"{base}/b", b"2")
        kv.delete(f"{base}/a")
        seen = []
        events = kv.watch(base, prefix=True, since=first.rev)
        for event in events:
            seen.append((event.type.value, event.key, event.kv.value))
            if len(seen) == 3:
                break
        events.close()  # type: ignore[attr-defined]
        assert seen == [("put", f"{base}/a", b"1"), ("put", f"{base}/b", b"2"),
                        ("delete", f"{base}/a", b"")]
        assert kv.get(f"{base}/b").value == b"2"  # still usable after the watch


def test_sync_client_close_leaves_no_task_pending(cluster: DevCluster) -> None:
    """Closing must not abandon tasks on the private loop it then closes.

    A task left pending on a closed loop is destroyed later by the garbage
    collector ("Task was destroyed but it is pending!"), and its finalizer
    raises "Event loop is closed" from whatever code runs at that moment.
    """
    def close_and_look() -> list[str]:
        kv = SyncClient(cluster.settings())
        kv.put(f"/t/sync-close-{uuid.uuid4().hex[:8]}", b"1")
        loop = kv._loop
        kv.close()
        assert loop.is_closed()
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:  # the collector may destroy them quietly
            task._log_destroy_pending = False  # type: ignore[attr-defined]
        return [repr(task) for task in pending]

    described = close_and_look()  # no reference to the tasks outlives the call
    gc.collect()
    assert described == []
