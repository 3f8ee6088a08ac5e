"""Unit tests for kvstore.storage: the LMDB engine, on a temporary directory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.config import Limits
from kvstore.storage import (
    CompactOp,
    DeleteEphemeralOp,
    DeleteOp,
    Engine,
    Outcome,
    PutOp,
    Retention,
    WriteOp,
)
from protocol import keys
from protocol.errors import Compacted, KeyNotFound, NotOwner, StorageFull, VersionMismatch
from protocol.model import EventType, KeyValue

ROOT = "/"
OTHER = "/other"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine(tmp_path / "db", [ROOT, OTHER], map_size=1 << 26, sync=False)
    yield eng
    eng.close()


def apply_one(engine: Engine, op: WriteOp) -> Outcome:
    [outcome] = engine.apply([op])
    return outcome


def put(engine: Engine, key: str, value: bytes = b"v", shard: str = ROOT, **kw) -> Outcome:
    outcome = apply_one(engine, PutOp(shard, key, value, **kw))
    assert outcome.error is None, outcome.error
    return outcome


def all_records(engine: Engine, shard: str = ROOT, key: str = ROOT) -> list[KeyValue]:
    records, more, _ = engine.range(shard, key, limit=10**9)
    assert not more
    return records


# --- revisions and versions ---------------------------------------------------------


def test_revisions_per_shard_increase_by_one_per_successful_write(engine: Engine) -> None:
    assert engine.revision(ROOT) == 0
    assert engine.revision(OTHER) == 0
    ops: list[WriteOp] = [
        PutOp(ROOT, "/a", b"1"),                      # rev 1
        PutOp(ROOT, "/a", b"2", if_version=5),        # fails
        PutOp(OTHER, "/other/x", b"1"),               # other shard rev 1
        DeleteOp(ROOT, "/missing"),                   # fails
        PutOp(ROOT, "/b", b"1"),                      # rev 2
        DeleteOp(ROOT, "/a", if_mod_rev=77),          # fails
        DeleteOp(ROOT, "/a"),                         # rev 3
        PutOp(ROOT, "/c", b"", if_version=0),         # rev 4
        PutOp(ROOT, "/c", b"", if_version=0),         # fails: exists
    ]
    outcomes = engine.apply(ops)
    assert [o.rev for o in outcomes] == [1, 0, 1, 0, 2, 0, 3, 4, 0]
    assert [type(o.error) for o in outcomes] == [
        type(None), VersionMismatch, type(None), KeyNotFound, type(None), VersionMismatch,
        type(None), type(None), VersionMismatch,
    ]
    assert all(not o.changes for o in outcomes if o.error)
    assert engine.revision(ROOT) == 4
    assert engine.revision(OTHER) == 1
    # A second batch continues where the first ended.
    assert put(engine, "/d").rev == 5
    assert engine.revision(ROOT) == 5
    # Failed ops left no trace in the log either.
    changes, _ = engine.events(ROOT, 1)
    assert [c.rev for c in changes] == [1, 2, 3, 4, 5]


def test_reads_report_the_revision(engine: Engine) -> None:
    put(engine, "/a")
    put(engine, "/b")
    record, rev = engine.get(ROOT, "/a")
    assert record is not None and rev == 2
    assert engine.get(ROOT, "/nope") == (None, 2)
    assert engine.range(ROOT, ROOT, limit=10)[2] == 2
    assert engine.children(ROOT, ROOT, limit=10)[2] == 2


def test_create_rev_mod_rev_version(engine: Engine) -> None:
    put(engine, "/x")  # rev 1
    first = put(engine, "/a", b"one").kv  # rev 2
    assert first is not None
    assert (first.version, first.create_rev, first.mod_rev) == (1, 2, 2)
    put(engine, "/x")  # rev 3
    second = put(engine, "/a", b"two").kv  # rev 4
    assert second is not None
    assert (second.version, second.create_rev, second.mod_rev) == (2, 2, 4)
    record, _ = engine.get(ROOT, "/a")
    assert record == KeyValue("/a", b"two", 2, 2, 4)
    # Delete, then create again: a new life starts at version 1.
    deleted = apply_one(engine, DeleteOp(ROOT, "/a"))
    assert deleted.rev == 5 and deleted.deleted == 1
    tombstone = deleted.changes[0].events[0]
    assert tombstone.type is EventType.DELETE
    assert tombstone.kv == KeyValue("/a", b"", 0, 2, 5)
    assert tombstone.prev == KeyValue("/a", b"two", 2, 2, 4)
    again = put(engine, "/a", b"three").kv
    assert again is not None
    assert (again.version, again.create_rev, again.mod_rev) == (1, 6, 6)


def test_put_event_carries_the_previous_record(engine: Engine) -> None:
    created = put(engine, "/a", b"1").changes[0].events[0]
    assert created.type is EventType.PUT and created.prev is None
    updated = put(engine, "/a", b"2").changes[0].events[0]
    assert updated.prev == KeyValue("/a", b"1", 1, 1, 1)
    assert updated.kv == KeyValue("/a", b"2", 2, 1, 2)


def test_if_version_zero_means_must_not_exist(engine: Engine) -> None:
    assert put(engine, "/a", b"1", if_version=0).rev == 1
    failed = apply_one(engine, PutOp(ROOT, "/a", b"2", if_version=0))
    assert isinstance(failed.error, VersionMismatch)
    assert failed.error.current_version == 1
    assert failed.error.current_mod_rev == 1
    assert engine.get(ROOT, "/a")[0].value == b"1"  # type: ignore[union-attr]


def test_compares_report_the_current_version_and_mod_rev(engine: Engine) -> None:
    put(engine, "/other-key")  # rev 1
    put(engine, "/a", b"1")  # rev 2
    put(engine, "/a", b"2")  # rev 3, version 2
    for op in (PutOp(ROOT, "/a", b"x", if_version=1),
               PutOp(ROOT, "/a", b"x", if_mod_rev=2),
               PutOp(ROOT, "/a", b"x", if_version=2, if_mod_rev=2),
               DeleteOp(ROOT, "/a", if_version=3),
               DeleteOp(ROOT, "/a", if_mod_rev=1)):
        outcome = apply_one(engine, op)
        assert isinstance(outcome.error, VersionMismatch), op
        assert (outcome.error.current_version, outcome.error.current_mod_rev) == (2, 3)
    assert engine.revision(ROOT) == 3
    # A missing key compares as version 0, mod-rev 0.
    missing = apply_one(engine, PutOp(ROOT, "/new", b"x", if_mod_rev=3))
    assert isinstance(missing.error, VersionMismatch)
    assert (missing.error.current_version, missing.error.current_mod_rev) == (0, 0)
    # Matching compares succeed.
    assert put(engine, "/a", b"3", if_version=2, if_mod_rev=3).rev == 4
    ok = apply_one(engine, DeleteOp(ROOT, "/a", if_version=3, if_mod_rev=4))
    assert ok.error is None and ok.rev == 5


def test_delete_of_a_missing_key_changes_nothing(engine: Engine) -> None:
    put(engine, "/a")
    outcome = apply_one(engine, DeleteOp(ROOT, "/b"))
    assert isinstance(outcome.error, KeyNotFound)
    assert outcome.deleted == 0 and not outcome.changes
    assert engine.revision(ROOT) == 1
    assert [r.key for r in all_records(engine)] == ["/a"]
    # A key that is only an implicit directory holds no value: not found either.
    put(engine, "/dir/leaf")
    assert isinstance(apply_one(engine, DeleteOp(ROOT, "/dir")).error, KeyNotFound)
    assert engine.revision(ROOT) == 2


def test_prefix_delete_is_one_revision_and_segment_wise(engine: Engine) -> None:
    for key in ("/a", "/a/b", "/a/b/c", "/a/d", "/ab", "/a-b", "/b"):
        put(engine, key)
    outcome = apply_one(engine, DeleteOp(ROOT, "/a", prefix=True))
    assert outcome.error is None
    assert outcome.deleted == 4
    assert len(outcome.changes) == 1
    change = outcome.changes[0]
    assert change.rev == 8 == engine.revision(ROOT)
    assert [e.key for e in change.events] == ["/a", "/a/b", "/a/b/c", "/a/d"]
    assert all(e.type is EventType.DELETE and e.rev == 8 for e in change.events)
    assert [r.key for r in all_records(engine)] == ["/a-b", "/ab", "/b"]
    # The log holds the same single revision.
    [logged], _ = engine.events(ROOT, 8)
    assert [e.key for e in logged.events] == ["/a", "/a/b", "/a/b/c", "/a/d"]
    # Nothing left under /a: a prefix delete of nothing is no revision.
    empty = apply_one(engine, DeleteOp(ROOT, "/a", prefix=True))
    assert empty.error is None and empty.deleted == 0 and empty.rev == 0
    assert engine.revision(ROOT) == 8


def test_prefix_delete_of_an_implicit_directory(engine: Engine) -> None:
    put(engine, "/dir/x")
    put(engine, "/dir/y/z")
    put(engine, "/dirt")
    outcome = apply_one(engine, DeleteOp(ROOT, "/dir", prefix=True))
    assert outcome.deleted == 2
    assert [r.key for r in all_records(engine)] == ["/dirt"]


def test_prefix_delete_of_the_root_empties_only_its_shard(engine: Engine) -> None:
    put(engine, "/a")
    put(engine, "/b/c")
    put(engine, "/other/x", shard=OTHER)
    outcome = apply_one(engine, DeleteOp(ROOT, ROOT, prefix=True))
    assert outcome.deleted == 2
    assert all_records(engine) == []
    assert [r.key for r in all_records(engine, OTHER)] == ["/other/x"]


def test_unknown_shard_is_not_owner(engine: Engine) -> None:
    with pytest.raises(NotOwner):
        engine.get("/nope", "/nope/a")
    outcome = apply_one(engine, PutOp("/nope", "/nope/a", b""))
    assert isinstance(outcome.error, NotOwner)


# --- range --------------------------------------------------------------------------

TREE = ["/a", "/a/b", "/a/b/c", "/a/b-c", "/a-", "/ab", "/b", "/b/a", "/z/z/z", "/é"]


def test_range_is_in_tree_order_and_segment_wise(engine: Engine) -> None:
    for key in reversed(TREE):
        put(engine, key, key.encode())
    assert [r.key for r in all_records(engine)] == TREE
    assert [r.value for r in all_records(engine)] == [k.encode() for k in TREE]
    assert [r.key for r in all_records(engine, key="/a")] == ["/a", "/a/b", "/a/b/c", "/a/b-c"]
    assert [r.key for r in all_records(engine, key="/a/b")] == ["/a/b", "/a/b/c"]
    assert [r.key for r in all_records(engine, key="/z")] == ["/z/z/z"]
    assert all_records(engine, key="/nothing") == []


def test_range_limit(engine: Engine) -> None:
    for key in TREE:
        put(engine, key)
    records, more, _ = engine.range(ROOT, ROOT, limit=3)
    assert [r.key for r in records] == TREE[:3] and more
    records, more, _ = engine.range(ROOT, ROOT, limit=len(TREE))
    assert len(records) == len(TREE) and not more
    records, more, _ = engine.range(ROOT, "/a", limit=4)
    assert len(records) == 4 and not more


def _walk_pages(engine: Engine, key: str, limit: int,
                max_bytes: int | None = None) -> tuple[list[KeyValue], int]:
    found: list[KeyValue] = []
    after: str | None = None
    pages = 0
    while True:
        page, more, _ = engine.range(ROOT, key, limit=limit, after=after, max_bytes=max_bytes)
        pages += 1
        assert page or not more, "an empty page must not claim more"
        found.extend(page)
        if not more:
            return found, pages
        after = page[-1].key


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 100])
def test_range_pagination_with_after_equals_a_full_read(engine: Engine, limit: int) -> None:
    many = TREE + [f"/a/b/n{i:03d}" for i in range(30)] + [f"/m{i}" for i in range(10)]
    for key in many:
        put(engine, key)
    for top in (ROOT, "/a", "/a/b", "/b"):
        full = all_records(engine, key=top)
        paged, pages = _walk_pages(engine, top, limit)
        assert paged == full
        assert pages >= len(full) // limit


def test_range_after_a_key_that_does_not_exist(engine: Engine) -> None:
    for key in TREE:
        put(engine, key)
    records, _, _ = engine.range(ROOT, ROOT, limit=100, after="/a/b/bb")
    assert [r.key for r in records] == TREE[2:]
    # An `after` before the subtree starts at its top; after its end gives nothing.
    records, _, _ = engine.range(ROOT, "/b", limit=100, after="/a")
    assert [r.key for r in records] == ["/b", "/b/a"]
    assert engine.range(ROOT, "/a", limit=100, after="/b")[0] == []


def test_range_byte_budget(engine: Engine) -> None:
    for i in range(20):
        put(engine, f"/k{i:02d}", bytes(1000))
    records, more, _ = engine.range(ROOT, ROOT, limit=100, max_bytes=5000)
    assert more
    assert 1 <= len(records) < 5
    assert sum(len(r.value) for r in records) <= 5000
    # Every page makes progress, even when one value alone is over the budget.
    records, more, _ = engine.range(ROOT, ROOT, limit=100, max_bytes=10)
    assert len(records) == 1 and more
    paged, _ = _walk_pages(engine, ROOT, limit=100, max_bytes=3000)
    assert paged == all_records(engine)
    records, more, _ = engine.range(ROOT, ROOT, limit=100, max_bytes=10**6)
    assert len(records) == 20 and not more


def test_range_of_a_shard_below_the_key(engine: Engine) -> None:
    put(engine, "/other/a", shard=OTHER)
    put(engine, "/other/b/c", shard=OTHER)
    # A subtree read of / in the /other shard yields all of that shard.
    assert [r.key for r in all_records(engine, OTHER, ROOT)] == ["/other/a", "/other/b/c"]


def test_subtree_operations_outside_the_shard_touch_nothing(engine: Engine) -> None:
    put(engine, "/other/a", shard=OTHER)
    put(engine, "/other/b/c", shard=OTHER)
    assert engine.range(OTHER, "/b", limit=10) == ([], False, 2)
    assert engine.range(OTHER, "/othe", limit=10)[0] == []
    outcome = apply_one(engine, DeleteOp(OTHER, "/b", prefix=True))
    assert outcome.error is None and outcome.deleted == 0 and not outcome.changes
    assert engine.revision(OTHER) == 2
    assert [r.key for r in all_records(engine, OTHER, ROOT)] == ["/other/a", "/other/b/c"]


# --- children -----------------------------------------------------------------------


def test_children_count_implicit_directories_sorted(engine: Engine) -> None:
    for key in ("/b", "/a/x/y", "/c/d", "/c", "/a-", "/ab/q", "/é/1"):
        put(engine, key)
    names, more, _ = engine.children(ROOT, ROOT, limit=100)
    assert names == ["a", "a-", "ab", "b", "c", "é"]
    assert not more
    assert engine.children(ROOT, "/a", limit=100)[0] == ["x"]
    assert engine.children(ROOT, "/a/x", limit=100)[0] == ["y"]
    assert engine.children(ROOT, "/c", limit=100)[0] == ["d"]
    assert engine.children(ROOT, "/b", limit=100)[0] == []
    assert engine.children(ROOT, "/nothing", limit=100)[0] == []
    assert engine.children(ROOT, "/a/x/y", limit=100)[0] == []


def test_children_pagination(engine: Engine) -> None:
    for key in ("/d/a", "/d/b/deep/er", "/d/b", "/d/c", "/d/cc/x", "/d/d", "/dd"):
        put(engine, key)
    names, more, _ = engine.children(ROOT, "/d", limit=2)
    assert names == ["a", "b"] and more
    names, more, _ = engine.children(ROOT, "/d", limit=2, after="b")
    assert names == ["c", "cc"] and more
    names, more, _ = engine.children(ROOT, "/d", limit=2, after="cc")
    assert names == ["d"] and not more
    # `after` need not be an existing child.
    assert engine.children(ROOT, "/d", limit=10, after="bb")[0] == ["c", "cc", "d"]
    assert engine.children(ROOT, "/d", limit=10, after="z")[0] == []


def test_ten_thousand_children_read_fully_across_pages(engine: Engine) -> None:
    expected = sorted(f"n{i:05d}" for i in range(10_000))
    ops: list[WriteOp] = [PutOp(ROOT, f"/big/{name}", b"") for name in expected]
    # Some children are directories with a subtree of their own.
    ops += [PutOp(ROOT, f"/big/{name}/sub/leaf", b"") for name in expected[::97]]
    outcomes = engine.apply(ops)
    assert all(o.error is None for o in outcomes)
    listed: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        names, more, _ = engine.children(ROOT, "/big", limit=1000, after=after)
        pages += 1
        listed.extend(names)
        if not more:
            break
        after = names[-1]
    assert listed == expected
    assert pages in (10, 11)


def test_children_of_a_key_above_the_shard(engine: Engine) -> None:
    put(engine, "/other/x", shard=OTHER)
    assert engine.children(OTHER, ROOT, limit=10)[0] == ["other"]
    assert engine.children(OTHER, "/other", limit=10)[0] == ["x"]
    assert engine.children(OTHER, "/unrelated", limit=10)[0] == []


# --- the log and compaction ---------------------------------------------------------


def test_events_replay_the_log_in_order(engine: Engine) -> None:
    applied = []
    applied += put(engine, "/a", b"1").changes
    applied += put(engine, "/b", b"2").changes
    applied += put(engine, "/a", b"3").changes
    applied += apply_one(engine, DeleteOp(ROOT, "/b")).changes
    put(engine, "/o/1", shard=OTHER)
    applied += apply_one(engine, DeleteOp(ROOT, ROOT, prefix=True)).changes
    changes, rev = engine.events(ROOT, 1)
    assert rev == 5
    assert [c.rev for c in changes] == [1, 2, 3, 4, 5]
    assert changes == applied
    # From the middle; with a limit; beyond the end.
    assert [c.rev for c in engine.events(ROOT, 3)[0]] == [3, 4, 5]
    assert [c.rev for c in engine.events(ROOT, 2, limit=2)[0]] == [2, 3]
    assert engine.events(ROOT, 6) == ([], 5)
    # Another shard has its own log.
    other, other_rev = engine.events(OTHER, 1)
    assert other_rev == 1 and [e.key for c in other for e in c.events] == ["/o/1"]


def test_the_log_replays_ephemeral_keys_as_they_were_applied(engine: Engine) -> None:
    """A watcher resuming from the log must see the same events as a live one."""
    applied = []
    applied += put(engine, "/e", b"1", ephemeral=ALICE).changes
    applied += put(engine, "/e", b"2", ephemeral=ALICE).changes
    applied += put(engine, "/e", b"3").changes
    applied += put(engine, "/e", b"4", ephemeral=BOB).changes
    applied += apply_one(engine, DeleteOp(ROOT, "/e")).changes
    applied += put(engine, "/f", b"5", ephemeral=ALICE).changes
    applied += apply_one(engine, DeleteEphemeralOp(ALICE)).changes
    changes, _ = engine.events(ROOT, 1)
    assert changes == applied
    assert changes[0].events[0].kv.ephemeral == ALICE
    assert changes[1].events[0].prev.ephemeral == ALICE  # type: ignore[union-attr]
    assert changes[2].events[0].kv.ephemeral is None


def test_events_byte_budget_always_makes_progress(engine: Engine) -> None:
    for i in range(10):
        put(engine, f"/k{i}", bytes(500))
    changes, _ = engine.events(ROOT, 1, max_bytes=1)
    assert [c.rev for c in changes] == [1]
    changes, _ = engine.events(ROOT, 1, max_bytes=2000)
    assert 1 < len(changes) < 10


def test_compaction_by_count(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "db", [ROOT], sync=False,
                    retention=Retention(max_revisions=3, max_age_seconds=3600))
    try:
        assert engine.compaction_target(ROOT) == 0
        for i in range(10):
            put(engine, f"/k{i}")
        target = engine.compaction_target(ROOT)
        assert target == 7
        assert apply_one(engine, CompactOp(ROOT, target)).deleted == 7
        assert engine.compact_revision(ROOT) == 7
        assert engine.revision(ROOT) == 10  # compaction is no revision
        assert [c.rev for c in engine.events(ROOT, 8)[0]] == [8, 9, 10]
        for start in (1, 6, 7):
            with pytest.raises(Compacted) as caught:
                engine.events(ROOT, start)
            assert caught.value.compact_rev == 7
        assert engine.compaction_target(ROOT) == 0  # nothing more to do
        # Compacting again below the point is a no-op.
        assert apply_one(engine, CompactOp(ROOT, 5)).deleted == 0
        assert engine.compact_revision(ROOT) == 7
        # Data itself is untouched.
        assert len(all_records(engine)) == 10
    finally:
        engine.close()


def test_compaction_by_age(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "db", [ROOT], sync=False,
                    retention=Retention(max_revisions=1000, max_age_seconds=60))
    try:
        for i in range(5):
            put(engine, f"/k{i}")
        assert engine.compaction_target(ROOT) == 0  # all young
        later = time.time() + 120
        assert engine.compaction_target(ROOT, now=later) == 5
        apply_one(engine, CompactOp(ROOT, 5))
        with pytest.raises(Compacted):
            engine.events(ROOT, 5)
        assert engine.events(ROOT, 6) == ([], 5)
        put(engine, "/new")
        # Only the old entries are old enough.
        assert engine.compaction_target(ROOT) == 0
        assert engine.compaction_target(ROOT, now=time.time() + 120) == 6
    finally:
        engine.close()


def test_compaction_respects_max_per_run(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "db", [ROOT], sync=False,
                    retention=Retention(max_revisions=2, max_per_run=3))
    try:
        for i in range(10):
            put(engine, f"/k{i}")
        assert apply_one(engine, CompactOp(ROOT, 8)).deleted == 3
        assert engine.compact_revision(ROOT) == 3
        assert apply_one(engine, CompactOp(ROOT, 8)).deleted == 3
        assert apply_one(engine, CompactOp(ROOT, 8)).deleted == 2
        assert engine.compact_revision(ROOT) == 8
        assert [c.rev for c in engine.events(ROOT, 9)[0]] == [9, 10]
        # Compaction never goes past the current revision.
        apply_one(engine, CompactOp(ROOT, 10**6))
        apply_one(engine, CompactOp(ROOT, 10**6))
        assert engine.compact_revision(ROOT) == 10
    finally:
        engine.close()


# --- ephemeral keys -----------------------------------------------------------------

ALICE = "alice@example.org/agent"
BOB = "bob@example.org/agent"


def test_delete_ephemeral_removes_exactly_the_owners_keys(engine: Engine) -> None:
    put(engine, "/e/a1", ephemeral=ALICE)
    put(engine, "/e/a2", ephemeral=ALICE)
    put(engine, "/other/a3", shard=OTHER, ephemeral=ALICE)
    put(engine, "/e/b1", ephemeral=BOB)
    put(engine, "/e/plain")
    put(engine, "/e/taken", ephemeral=ALICE)
    put(engine, "/e/taken", b"now permanent")  # overwritten: no longer Alice's
    put(engine, "/e/moved", ephemeral=ALICE)
    put(engine, "/e/moved", ephemeral=BOB)  # now Bob's
    put(engine, "/e/gone", ephemeral=ALICE)
    apply_one(engine, DeleteOp(ROOT, "/e/gone"))
    assert sorted(engine.ephemeral_owners()) == sorted([ALICE, BOB])
    root_rev, other_rev = engine.revision(ROOT), engine.revision(OTHER)

    outcome = apply_one(engine, DeleteEphemeralOp(ALICE))
    assert outcome.error is None
    assert outcome.deleted == 3
    # One new revision per shard touched, each with the keys in tree order.
    by_shard = {c.shard: c for c in outcome.changes}
    assert by_shard[ROOT].rev == root_rev + 1
    assert by_shard[OTHER].rev == other_rev + 1
    assert [e.key for e in by_shard[ROOT].events] == ["/e/a1", "/e/a2"]
    assert [e.key for e in by_shard[OTHER].events] == ["/other/a3"]
    assert all(e.type is EventType.DELETE for c in outcome.changes for e in c.events)
    assert [r.key for r in all_records(engine, key="/e")] == [
        "/e/b1", "/e/moved", "/e/plain", "/e/taken"]
    assert all_records(engine, OTHER) == []
    assert engine.ephemeral_owners() == [BOB]
    # Again: nothing left, no revision.
    again = apply_one(engine, DeleteEphemeralOp(ALICE))
    assert again.deleted == 0 and not again.changes
    assert engine.revision(ROOT) == root_rev + 1


def test_ephemeral_owners_with_similar_names(engine: Engine) -> None:
    owners = ["a@h/r", "a@h/r2", "a@h/r/x", "b@h/r"]
    for i, owner in enumerate(owners):
        put(engine, f"/k{i}", ephemeral=owner)
        put(engine, f"/k{i}/more", ephemeral=owner)
    assert sorted(engine.ephemeral_owners()) == sorted(owners)
    assert apply_one(engine, DeleteEphemeralOp("a@h/r")).deleted == 2
    assert sorted(engine.ephemeral_owners()) == sorted(owners[1:])
    assert [r.key for r in all_records(engine)] == ["/k1", "/k1/more", "/k2", "/k2/more",
                                                    "/k3", "/k3/more"]


def test_prefix_delete_clears_the_ephemeral_index(engine: Engine) -> None:
    put(engine, "/e/a", ephemeral=ALICE)
    apply_one(engine, DeleteOp(ROOT, "/e", prefix=True))
    assert engine.ephemeral_owners() == []
    put(engine, "/e/a", b"permanent")  # same key, recreated without an owner
    assert apply_one(engine, DeleteEphemeralOp(ALICE)).deleted == 0
    assert engine.get(ROOT, "/e/a")[0] is not None


def test_ephemeral_is_stored_with_the_record(engine: Engine) -> None:
    put(engine, "/e", ephemeral=ALICE)
    record, _ = engine.get(ROOT, "/e")
    assert record is not None and record.ephemeral == ALICE


# --- durability, limits, values -----------------------------------------------------


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db"
    engine = Engine(path, [ROOT, OTHER])
    put(engine, "/a", b"1")
    put(engine, "/a", b"2")
    put(engine, "/b/c", b"3", ephemeral=ALICE)
    put(engine, "/other/x", b"4", shard=OTHER)
    apply_one(engine, CompactOp(ROOT, 1))
    engine.close()

    engine = Engine(path, [ROOT, OTHER])
    try:
        assert engine.revision(ROOT) == 3
        assert engine.revision(OTHER) == 1
        assert engine.compact_revision(ROOT) == 1
        assert engine.get(ROOT, "/a")[0] == KeyValue("/a", b"2", 2, 1, 2)
        assert [c.rev for c in engine.events(ROOT, 2)[0]] == [2, 3]
        assert engine.ephemeral_owners() == [ALICE]
        assert put(engine, "/a", b"5").kv == KeyValue("/a", b"5", 3, 1, 4)
        assert engine.get(OTHER, "/other/x")[0].value == b"4"  # type: ignore[union-attr]
    finally:
        engine.close()


def test_a_full_map_refuses_the_batch_puts_and_reads_keep_working(tmp_path: Path) -> None:
    path = tmp_path / "db"
    engine = Engine(path, [ROOT], map_size=256 * 1024)
    try:
        put(engine, "/small", b"kept")
        outcomes = engine.apply([PutOp(ROOT, "/a", b"x"), PutOp(ROOT, "/huge", bytes(1 << 20))])
        assert all(isinstance(o.error, StorageFull) for o in outcomes)
        # Nothing of the failed batch applied, not even its small put.
        assert engine.revision(ROOT) == 1
        assert engine.get(ROOT, "/a") == (None, 1)
        assert engine.get(ROOT, "/small")[0].value == b"kept"  # type: ignore[union-attr]
        assert [r.key for r in all_records(engine)] == ["/small"]
        assert [c.rev for c in engine.events(ROOT, 1)[0]] == [1]
        # Small writes still fit.
        assert put(engine, "/after", b"ok").rev == 2
    finally:
        engine.close()
    engine = Engine(path, [ROOT], map_size=256 * 1024)
    try:
        assert engine.revision(ROOT) == 2
        assert [r.key for r in all_records(engine)] == ["/after", "/small"]
    finally:
        engine.close()


@pytest.mark.parametrize("size", [0, 1, 2, 3, 255, 256, 4095, 4096, 4097, 65_536,
                                  Limits().max_value_bytes - 1, Limits().max_value_bytes,
                                  180_000])
def test_values_round_trip_at_every_size(engine: Engine, size: int) -> None:
    value = bytes((i * 7 + size) % 256 for i in range(size))
    outcome = put(engine, "/v", value)
    assert outcome.kv is not None and outcome.kv.value == value
    assert engine.get(ROOT, "/v")[0].value == value  # type: ignore[union-attr]
    assert all_records(engine)[0].value == value
    [change], _ = engine.events(ROOT, outcome.rev)
    assert change.events[0].kv.value == value


@pytest.mark.parametrize("value", [b"", b"\x00", b"\xff\xfe\xfd", b"\x80abc", "é".encode()[:1],
                                   b"\x00" * 100, bytes(range(256))])
def test_non_utf8_values_round_trip(engine: Engine, value: bytes) -> None:
    put(engine, "/v", value)
    assert engine.get(ROOT, "/v")[0].value == value  # type: ignore[union-attr]
    assert isinstance(engine.get(ROOT, "/v")[0].value, bytes)  # type: ignore[union-attr]


def test_keys_at_the_byte_limit_are_stored(engine: Engine) -> None:
    key = "/" + "é" * 249 + "a"  # 500 bytes
    assert keys.is_valid(key)
    put(engine, key, b"x")
    assert engine.get(ROOT, key)[0] is not None
    assert engine.children(ROOT, ROOT, limit=10)[0] == [key[1:]]


@pytest.mark.parametrize(("name", "size", "count"), [
    ("k", 66_000, 10), ("k", 40_000, 20), ("&<>\"é" * 40, 0, 3000), ("é" * 200, 10, 3000),
])
def test_a_page_read_with_a_byte_budget_serializes_within_it(engine: Engine, name: str,
                                                             size: int, count: int) -> None:
    """The node reads pages with its stanza budget: what goes on the wire is base64."""
    from slixmpp.xmlstream import tostring

    from protocol import stanza as wire

    budget = 200_000
    ops: list[WriteOp] = [PutOp(ROOT, f"/p/{name}{i:04d}", bytes(size))
                          for i in range(count)]
    engine.apply(ops)
    after: str | None = None
    total = 0
    while True:
        page, more, _ = engine.range(ROOT, "/p", limit=1000, after=after, max_bytes=budget)
        answer = wire.Get()
        answer.set_attrs(rev=10**6, more=more)
        answer.set_items(page)
        assert len(tostring(answer.xml).encode()) <= budget
        total += len(page)
        if not more:
            break
        after = page[-1].key
    assert total == count
