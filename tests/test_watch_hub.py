"""Unit tests for kvstore.watch_hub with a real engine and a fake XMPP session."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from slixmpp.xmlstream import tostring

from kvstore.storage import Change, CompactOp, DeleteOp, Engine, PutOp, WriteOp
from kvstore.watch_hub import WatchHub, WatchLimits
from protocol import stanza as wire
from protocol.errors import Compacted, ResourceLimit, Timeout, VersionMismatch
from protocol.model import Event, EventType

ROOT = "/"
ALICE = "alice@example.org/w"
BOB = "bob@example.org/w"


@dataclass
class Push:
    to: str
    payload: wire.Events
    future: asyncio.Future[object]

    @property
    def events(self) -> list[Event]:
        return self.payload.events()

    @property
    def rev(self) -> int:
        return int(self.payload.xml.get("rev"))

    @property
    def more(self) -> bool:
        return self.payload.bool_attr("more")

    @property
    def cancelled(self) -> str | None:
        return self.payload.xml.get("cancelled")

    @property
    def watch(self) -> str | None:
        return self.payload.xml.get("watch")


class FakeSession:
    """Records every IQ the hub sends; the test decides when (and how) each is answered."""

    def __init__(self) -> None:
        self.pushes: list[Push] = []

    def iq(self, to: str, type_: str, payload: object) -> SimpleNamespace:
        assert type_ == "set"
        return SimpleNamespace(to=to, xml=payload)

    def send_iq(self, iq: SimpleNamespace, timeout: float) -> asyncio.Future[object]:
        assert timeout > 0
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        # Serialize and parse, as the stanza would travel.
        element = wire.ET.fromstring(wire.ET.tostring(iq.xml))
        self.pushes.append(Push(iq.to, wire.Events(xml=element), future))
        return future

    def unacked(self, to: str | None = None) -> list[Push]:
        return [p for p in self.pushes
                if not p.future.done() and (to is None or p.to == to)]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine(tmp_path / "db", [ROOT], map_size=1 << 26, sync=False)
    yield eng
    eng.close()


def make_hub(engine: Engine, session: FakeSession, **limits: float) -> WatchHub:
    max_stanza = int(limits.pop("max_stanza_bytes", 200_000))
    return WatchHub(engine, session, max_stanza_bytes=max_stanza,  # type: ignore[arg-type]
                    limits=WatchLimits(**limits))  # type: ignore[arg-type]


def commit(engine: Engine, hub: WatchHub | None, *ops: WriteOp) -> list[Change]:
    """Apply ops as the committer would, then publish them (unless hub is None)."""
    outcomes = engine.apply(list(ops))
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    changes = [c for o in outcomes for c in o.changes]
    if hub is not None:
        hub.publish(changes)
    return changes


def put(engine: Engine, hub: WatchHub | None, key: str, value: bytes = b"v") -> Change:
    [change] = commit(engine, hub, PutOp(ROOT, key, value))
    return change


async def settle() -> None:
    """Let callbacks scheduled with call_soon (acks, catch-up steps) run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def ack_all(session: FakeSession, to: str | None = None) -> int:
    """Acknowledge pushes until none is outstanding; return how many were acked."""
    acked = 0
    while True:
        pending = session.unacked(to)
        if not pending:
            await settle()
            if not session.unacked(to):
                return acked
            continue
        for push in pending:
            push.future.set_result(None)
            acked += 1
        await settle()


def delivered(session: FakeSession, to: str = ALICE, watch: str = "w") -> list[tuple[int, str]]:
    return [(e.rev, e.key) for p in session.pushes if p.to == to and p.watch == watch
            for e in p.events]


# --- from now -------------------------------------------------------------------


async def test_a_watch_from_now_sees_only_later_commits(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    put(engine, hub, "/a")  # rev 1
    # Committed but not yet published when the watch is created (the writer
    # thread finished, the loop has not run the callback yet).
    late = put(engine, None, "/a")  # rev 2
    watch = hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key="/a", prefix=False,
                       start_rev=None)
    assert watch.next_rev == 3 and watch.synced
    hub.publish([late])
    await settle()
    assert session.pushes == []
    put(engine, hub, "/b")  # rev 3: not watched
    put(engine, hub, "/a/child")  # rev 4: not watched (not a prefix watch)
    put(engine, hub, "/a", b"new")  # rev 5
    await settle()
    assert len(session.pushes) == 1
    push = session.pushes[0]
    assert push.to == ALICE and push.watch == "w" and push.rev == 5
    assert push.payload.xml.get("shard") == ROOT
    assert [(e.type, e.key, e.kv.value, e.rev) for e in push.events] == [
        (EventType.PUT, "/a", b"new", 5)]
    assert push.events[0].prev is None  # prev_kv not asked for
    hub.close()


async def test_start_rev_zero_means_now(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    put(engine, hub, "/a")
    watch = hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True,
                       start_rev=0)
    assert watch.next_rev == 2 and watch.synced
    await settle()
    assert session.pushes == []


async def test_prefix_watch_is_segment_wise_and_prev_kv(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key="/cluster/ey04", prefix=True,
               start_rev=None, prev_kv=True)
    for key in ("/cluster/ey04", "/cluster/ey040", "/cluster/ey04/slice", "/cluster/ey0"):
        put(engine, hub, key, b"1")
    put(engine, hub, "/cluster/ey04", b"2")
    await ack_all(session)
    assert delivered(session) == [(1, "/cluster/ey04"), (3, "/cluster/ey04/slice"),
                                  (5, "/cluster/ey04")]
    last = session.pushes[-1].events[-1]
    assert last.prev is not None and last.prev.value == b"1" and last.kv.value == b"2"


# --- catch-up from history ------------------------------------------------------


async def test_a_watch_from_an_old_revision_catches_up_then_goes_live(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, window=2, catch_up_revisions=3, max_stanza_bytes=1000)
    for i in range(1, 21):
        put(engine, hub, f"/k/{i}")
    watch = hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key="/k", prefix=True,
                       start_rev=5)
    assert not watch.synced and watch.next_rev == 5
    assert session.pushes == []  # the history goes out after the confirmation
    await settle()
    assert 1 <= len(session.unacked()) <= 2
    # Keep committing while the watcher works through the history: half of
    # the commits are published at once, half reach the log before the hub
    # hears of them (as when the writer thread beats the event loop).
    rev = 20
    while session.unacked():
        session.unacked()[0].future.set_result(None)
        rev += 1
        if rev % 2:
            put(engine, hub, f"/k/{rev}")
            await settle()
        else:
            change = put(engine, None, f"/k/{rev}")
            await settle()
            hub.publish([change])
        await settle()
        assert len(session.unacked()) <= 2
        if rev > 200:
            break
    assert watch.synced
    for _ in range(3):
        rev += 1
        put(engine, hub, f"/k/{rev}")
    await ack_all(session)
    got = [r for r, _ in delivered(session)]
    assert got == list(range(5, rev + 1)), "every revision exactly once, in order"
    assert [k for _, k in delivered(session)] == [f"/k/{r}" for r in got]
    revs = [p.rev for p in session.pushes]
    assert revs == sorted(revs)
    assert session.pushes[-1].rev == rev


async def test_catch_up_skips_history_that_does_not_match(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, catch_up_revisions=2)
    for i in range(30):
        put(engine, hub, f"/noise/{i}")
    put(engine, hub, "/x")  # rev 31
    for i in range(30):
        put(engine, hub, f"/noise/{i}")
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key="/x", prefix=False, start_rev=1)
    for _ in range(40):
        await asyncio.sleep(0)
    await ack_all(session)
    assert delivered(session) == [(31, "/x")]
    assert session.pushes[0].rev >= 31
    put(engine, hub, "/x")
    await ack_all(session)
    assert delivered(session) == [(31, "/x"), (62, "/x")]


async def test_start_rev_in_the_future_waits_for_it(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    put(engine, hub, "/a")
    watch = hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key="/a", prefix=False,
                       start_rev=4)
    assert watch.synced
    for _ in range(4):
        put(engine, hub, "/a")
    await ack_all(session)
    assert [r for r, _ in delivered(session)] == [4, 5]


async def test_start_below_the_compaction_point_is_compacted(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    for i in range(10):
        put(engine, hub, f"/k{i}")
    commit(engine, hub, CompactOp(ROOT, 6))
    for start in (1, 5, 6):
        with pytest.raises(Compacted) as caught:
            hub.create(watch_id=f"w{start}", watcher=ALICE, shard=ROOT, key=ROOT,
                       prefix=True, start_rev=start)
        assert caught.value.compact_rev == 6
    assert hub.watch_count == 0
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=7)
    await ack_all(session)
    assert [r for r, _ in delivered(session)] == [7, 8, 9, 10]


async def test_compaction_during_catch_up_cancels_the_watch(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, window=1, catch_up_revisions=2)
    for i in range(10):
        put(engine, hub, f"/k{i}")
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=2)
    await settle()
    [first] = session.unacked()
    assert [e.rev for e in first.events] == [2, 3]
    commit(engine, hub, CompactOp(ROOT, 8))
    first.future.set_result(None)
    await settle()
    last = session.pushes[-1]
    assert last.cancelled == "compacted"
    assert last.rev == 3  # resume from 4, which is gone: the watcher must re-read
    assert hub.watch_count == 0


@pytest.mark.parametrize("prev_kv", [False, True])
async def test_a_revision_reads_the_same_live_and_from_the_log(engine: Engine,
                                                               prev_kv: bool) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    hub.create(watch_id="live", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True,
               start_rev=None, prev_kv=prev_kv)
    commit(engine, hub, PutOp(ROOT, "/e", b"1", ephemeral=BOB))
    commit(engine, hub, PutOp(ROOT, "/e", b"2", ephemeral=BOB))
    commit(engine, hub, PutOp(ROOT, "/e", b"3"))
    commit(engine, hub, PutOp(ROOT, "/f/g", b"4", ephemeral=BOB))
    commit(engine, hub, DeleteOp(ROOT, "/e"))
    commit(engine, hub, DeleteOp(ROOT, ROOT, prefix=True))
    await ack_all(session)
    hub.create(watch_id="replay", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True,
               start_rev=1, prev_kv=prev_kv)
    await ack_all(session)

    def received(watch: str) -> list[Event]:
        return [event for p in session.pushes if p.watch == watch
                for event in p.payload.events()]

    live = received("live")
    assert len(live) == 6
    assert live == received("replay")
    assert (live[1].prev is not None) == prev_kv


# --- flow control -----------------------------------------------------------------


async def test_at_most_window_pushes_are_unacknowledged(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, window=3)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    for i in range(20):
        put(engine, hub, f"/k{i}")
        await settle()
        assert len(session.unacked()) == min(i + 1, 3)
    assert len(session.pushes) == 3
    # One ack lets one more push out, carrying everything that waited.
    session.pushes[0].future.set_result(None)
    await settle()
    assert len(session.pushes) == 4
    assert len(session.unacked()) == 3
    assert [e.rev for e in session.pushes[3].events] == list(range(4, 21))
    assert session.pushes[3].rev == 20
    await ack_all(session)
    assert [r for r, _ in delivered(session)] == list(range(1, 21))


async def test_acks_never_open_more_than_the_window(engine: Engine) -> None:
    session = FakeSession()
    # A budget of one revision per push: the buffer drains one push at a time.
    hub = make_hub(engine, session, window=2, max_stanza_bytes=150)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    for i in range(12):
        put(engine, hub, f"/k{i}")
    await settle()
    assert len(session.pushes) == 2
    while session.unacked():
        session.unacked()[0].future.set_result(None)
        await settle()
        assert len(session.unacked()) <= 2
    assert len(session.pushes) == 12
    assert [r for r, _ in delivered(session)] == list(range(1, 13))


async def test_window_applies_to_catch_up_too(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, window=2, max_stanza_bytes=300)
    for i in range(10):
        put(engine, hub, f"/k{i}")
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(session.pushes) == 2
    await ack_all(session)
    assert [r for r, _ in delivered(session)] == list(range(1, 11))


def _check_atomic(session: FakeSession, changes: dict[int, list[str]]) -> None:
    """Each push holds whole revisions, or a split revision marked with more."""
    split: int | None = None
    for push in session.pushes:
        revs = sorted({e.rev for e in push.events})
        for rev in revs:
            keys_here = [e.key for e in push.events if e.rev == rev]
            if keys_here != changes[rev]:
                # A partial revision: allowed only as a continuation or with more.
                assert rev == split or (push.more and rev == revs[-1]), (rev, keys_here)
        if push.more:
            assert push.rev == revs[-1]
            split = revs[-1]
        else:
            split = None


async def test_a_revision_is_never_split_when_it_fits(engine: Engine) -> None:
    session = FakeSession()
    # Five events of about 130 bytes each fit in 1000 bytes; two such revisions do not.
    hub = make_hub(engine, session, window=1, max_stanza_bytes=1000)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    changes: dict[int, list[str]] = {}
    for i in range(8):
        paths = [f"/r{i}/{j}" for j in range(5)]
        for change in commit(engine, None, *[PutOp(ROOT, p, b"") for p in paths]):
            changes[change.rev] = [e.key for e in change.events]
        # One revision holding all five keys: delete them together.
        [change] = commit(engine, hub, DeleteOp(ROOT, f"/r{i}", prefix=True))
        changes[change.rev] = [e.key for e in change.events]
        assert len(change.events) == 5
    await ack_all(session)
    assert not any(p.more for p in session.pushes)
    for push in session.pushes:
        revs = {e.rev for e in push.events}
        for rev in revs:
            assert [e.key for e in push.events if e.rev == rev] == changes[rev]
    # Only the deletes were published to the hub.
    assert sorted({e.rev for p in session.pushes for e in p.events}) == list(range(6, 49, 6))


async def test_one_revision_over_the_budget_is_split_with_more(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, window=1, max_stanza_bytes=1000)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    paths = [f"/big/{j:02d}" for j in range(40)]
    commit(engine, hub, *[PutOp(ROOT, p, b"") for p in paths])  # revs 1-40
    await ack_all(session)
    session.pushes.clear()
    [big] = commit(engine, hub, DeleteOp(ROOT, "/big", prefix=True))  # rev 41, 40 events
    put(engine, hub, "/after")  # rev 42
    await ack_all(session)
    pushes = session.pushes
    assert len(pushes) > 2
    split = [p for p in pushes if any(e.rev == 41 for e in p.events)]
    assert all(p.more for p in split[:-1])
    assert not split[-1].more
    assert all(p.rev == 41 for p in split[:-1])
    assert [e.key for p in split for e in p.events if e.rev == 41] == [
        e.key for e in big.events]
    assert all(len(p.events) <= 1000 // 120 for p in pushes)
    assert [r for r, _ in delivered(session)] == [41] * 40 + [42]
    assert pushes[-1].rev == 42
    _check_atomic(session, {41: [e.key for e in big.events], 42: ["/after"]})


# --- slow and failing watchers ----------------------------------------------------


async def test_a_watcher_that_never_acks_is_cancelled_as_lagging(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, window=1, max_buffered_events=10)
    watch = hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True,
                       start_rev=None)
    other = hub.create(watch_id="w", watcher=BOB, shard=ROOT, key=ROOT, prefix=True,
                       start_rev=None)
    put(engine, hub, "/k0")  # rev 1: pushed, never acked by Alice
    await ack_all(session, BOB)
    for i in range(1, 11):
        put(engine, hub, f"/k{i}")  # revs 2-11: 10 buffered, within the limit
        await ack_all(session, BOB)
    assert hub.watch_count == 2
    assert len([p for p in session.pushes if p.to == ALICE]) == 1
    assert not [p for p in session.pushes if p.cancelled]
    put(engine, hub, "/k11")  # rev 12: the 11th buffered event is one too many
    await ack_all(session, BOB)
    cancels = [p for p in session.pushes if p.cancelled]
    assert len(cancels) == 1
    notice = cancels[0]
    assert notice.to == ALICE and notice.cancelled == "lagging" and notice.watch == "w"
    assert notice.rev == 1  # Alice has been sent revision 1; she resumes from 2
    assert notice.events == []
    assert hub.lagging_cancels == 1
    # The hub keeps nothing for Alice, and Bob is untouched.
    assert watch.closed and not watch.buffer
    assert hub.watch_count == 1
    assert ALICE not in hub._by_watcher
    assert watch not in hub._by_shard[ROOT]
    assert hub._watches == {(BOB, "w"): other}
    # Later commits and a late ack do not bring the watch back.
    pushes_before = len([p for p in session.pushes if p.to == ALICE])
    put(engine, hub, "/k12")
    for push in session.unacked(ALICE):
        push.future.set_result(None)
    await settle()
    assert len([p for p in session.pushes if p.to == ALICE]) == pushes_before
    await ack_all(session, BOB)
    assert [r for r, _ in delivered(session, BOB)] == list(range(1, 14))


async def test_the_byte_limit_also_cancels(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, window=1, max_buffered_bytes=5000)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    for i in range(10):
        put(engine, hub, f"/k{i}", bytes(1000))
    assert [p.cancelled for p in session.pushes] == [None, "lagging"]
    assert hub.watch_count == 0


async def test_a_failed_ack_drops_the_watch(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    hub.create(watch_id="w2", watcher=ALICE, shard=ROOT, key="/other", prefix=True,
               start_rev=None)
    put(engine, hub, "/a")
    [push] = session.unacked()
    push.future.set_exception(Timeout("no answer"))
    await settle()
    assert hub.watch_count == 1
    assert hub._watches.keys() == {(ALICE, "w2")}
    put(engine, hub, "/b")
    await settle()
    assert len(session.pushes) == 1
    assert not any(p.cancelled for p in session.pushes)


async def test_drop_watcher_removes_all_its_watches(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    for i in range(3):
        hub.create(watch_id=f"w{i}", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True,
                   start_rev=None)
    hub.create(watch_id="w0", watcher=BOB, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    assert hub.watch_count == 4
    hub.drop_watcher(ALICE)
    assert hub.watch_count == 1
    assert ALICE not in hub._by_watcher
    hub.drop_watcher("nobody@example.org/x")  # unknown: no error
    put(engine, hub, "/a")
    await settle()
    assert [p.to for p in session.pushes] == [BOB]
    # Alice may start afresh with the same ids.
    hub.create(watch_id="w0", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    assert hub.watch_count == 2


async def test_the_per_watcher_limit(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, max_watches_per_watcher=3)
    for i in range(3):
        hub.create(watch_id=f"w{i}", watcher=ALICE, shard=ROOT, key=f"/k{i}", prefix=False,
                   start_rev=None)
    with pytest.raises(ResourceLimit):
        hub.create(watch_id="w3", watcher=ALICE, shard=ROOT, key="/k3", prefix=False,
                   start_rev=None)
    assert hub.watch_count == 3
    # Someone else is not limited by Alice's watches.
    hub.create(watch_id="w0", watcher=BOB, shard=ROOT, key="/k0", prefix=False, start_rev=None)
    # A cancelled watch frees its place.
    assert hub.cancel(ALICE, "w1")
    assert not hub.cancel(ALICE, "w1")
    hub.create(watch_id="w3", watcher=ALICE, shard=ROOT, key="/k3", prefix=False,
               start_rev=None)


async def test_duplicate_watch_ids_are_refused(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key="/a", prefix=False, start_rev=None)
    with pytest.raises(VersionMismatch):
        hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key="/b", prefix=False,
                   start_rev=None)
    hub.create(watch_id="w", watcher=BOB, shard=ROOT, key="/b", prefix=False, start_rev=None)


async def test_a_cancelled_watch_gets_nothing_more(engine: Engine) -> None:
    session = FakeSession()
    hub = make_hub(engine, session, window=1)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    put(engine, hub, "/a")
    put(engine, hub, "/b")  # buffered behind the unacked push
    assert hub.cancel(ALICE, "w")
    session.pushes[0].future.set_result(None)
    await settle()
    put(engine, hub, "/c")
    await settle()
    assert len(session.pushes) == 1


# --- sizes ------------------------------------------------------------------------


def _serialized(push: Push) -> int:
    """Bytes on the wire, serialized as slixmpp sends it."""
    return len(tostring(push.payload.xml).encode("utf-8"))


@pytest.mark.parametrize("prev_kv", [False, True])
@pytest.mark.parametrize("name", ["é" * 120, "&" * 100 + "<>\"", "plain" * 40])
async def test_pushes_stay_within_the_stanza_budget(engine: Engine, prev_kv: bool,
                                                    name: str) -> None:
    """The budget is what goes on the wire: UTF-8 bytes, XML escapes, base64 and prev."""
    budget = 20_000
    session = FakeSession()
    hub = make_hub(engine, session, window=1, max_stanza_bytes=budget)
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None,
               prev_kv=prev_kv)
    paths = [f"/d/{name}{i:03d}" for i in range(200)]
    commit(engine, hub, *[PutOp(ROOT, p, bytes(30)) for p in paths])
    commit(engine, hub, DeleteOp(ROOT, "/d", prefix=True))
    await ack_all(session)
    assert [r for r, _ in delivered(session)] == list(range(1, 202)) + [201] * 199
    for push in session.pushes:
        assert _serialized(push) <= budget
        if prev_kv and push.events[0].type is EventType.DELETE:
            assert push.events[0].prev is not None


async def test_catch_up_over_busy_history_does_not_cancel_a_prompt_watcher(
        engine: Engine) -> None:
    """Each revision is small, but together they exceed the buffer limit."""
    session = FakeSession()
    hub = make_hub(engine, session, window=2, max_buffered_events=50)
    for i in range(20):
        commit(engine, hub, *[PutOp(ROOT, f"/k{i}/{j}", b"") for j in range(10)])
    assert engine.revision(ROOT) == 200
    # Ten-event revisions: prefix deletes.
    for i in range(20):
        commit(engine, hub, DeleteOp(ROOT, f"/k{i}", prefix=True))
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=150)
    await ack_all(session)
    assert not [p for p in session.pushes if p.cancelled]
    assert hub.lagging_cancels == 0
    got = [r for r, _ in delivered(session)]
    assert got == list(range(150, 201)) + [r for r in range(201, 221) for _ in range(10)]


async def test_one_revision_larger_than_the_buffer_limit_reaches_an_idle_watcher(
        engine: Engine) -> None:
    """A watcher with nothing outstanding is not lagging, however big the revision."""
    session = FakeSession()
    hub = make_hub(engine, session, window=1, max_buffered_events=10)
    commit(engine, hub, *[PutOp(ROOT, f"/big/{j:02d}", b"") for j in range(30)])
    hub.create(watch_id="w", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=None)
    commit(engine, hub, DeleteOp(ROOT, "/big", prefix=True))
    await ack_all(session)
    assert not [p for p in session.pushes if p.cancelled]
    assert [r for r, _ in delivered(session)] == [31] * 30
    # And resuming from before that revision works the same way.
    hub.create(watch_id="again", watcher=ALICE, shard=ROOT, key=ROOT, prefix=True, start_rev=31)
    await ack_all(session)
    assert not [p for p in session.pushes if p.cancelled]
    assert [r for r, _ in delivered(session, watch="again")] == [31] * 30
