"""Unit tests for kvstore.commit: group commit on a real engine, no network."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio

from kvstore.commit import Committer
from kvstore.storage import Change, DeleteOp, Engine, Outcome, PutOp, WriteOp
from protocol.errors import KeyNotFound, KvError, StorageFull, VersionMismatch

ROOT = "/"


class CountingEngine(Engine):
    """An engine that records every batch, and can be told to fail or to stall."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.fail_with: BaseException | None = None
        self.gate: threading.Event | None = None

    def apply(self, ops: Sequence[WriteOp]) -> list[Outcome]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(len(ops))
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return super().apply(ops)


@pytest.fixture
def engine(tmp_path: Path):
    eng = CountingEngine(tmp_path / "db", [ROOT], map_size=1 << 24, sync=False)
    yield eng
    eng.close()


@pytest_asyncio.fixture
async def committer(engine: CountingEngine) -> AsyncIterator[Committer]:
    com = Committer(engine)
    yield com
    await com.drain()
    com.close()


async def test_many_submits_in_one_iteration_share_a_commit(engine: CountingEngine,
                                                            committer: Committer) -> None:
    futures = [committer.submit(PutOp(ROOT, f"/k{i}", b"v")) for i in range(200)]
    outcomes = await asyncio.gather(*futures)
    assert committer.ops == 200
    assert committer.commits < 200
    assert committer.commits == len(engine.batches) == 1
    assert [o.rev for o in outcomes] == list(range(1, 201))
    assert engine.revision(ROOT) == 200


async def test_max_batch_splits_a_burst(engine: CountingEngine) -> None:
    committer = Committer(engine, max_batch=30)
    try:
        outcomes = await asyncio.gather(*(committer.submit(PutOp(ROOT, f"/k{i}", b""))
                                          for i in range(100)))
        assert engine.batches == [30, 30, 30, 10]
        assert [o.rev for o in outcomes] == list(range(1, 101))
    finally:
        committer.close()


async def test_writes_arriving_during_a_commit_join_the_next_one(
        engine: CountingEngine, committer: Committer) -> None:
    engine.gate = threading.Event()
    first = committer.submit(PutOp(ROOT, "/first", b""))
    await asyncio.sleep(0.05)  # the first commit is now stuck on the writer thread
    assert engine.batches == [] and not first.done()
    later = [committer.submit(PutOp(ROOT, f"/later{i}", b"")) for i in range(50)]
    assert committer.queued == 51  # submitted, not yet answered
    engine.gate.set()
    await asyncio.gather(first, *later)
    assert engine.batches == [1, 50]
    assert committer.commits == 2


async def test_outcomes_come_back_in_submission_order(engine: CountingEngine,
                                                      committer: Committer) -> None:
    ops: list[WriteOp] = [
        PutOp(ROOT, "/a", b"1"),
        PutOp(ROOT, "/a", b"2", if_version=7),
        DeleteOp(ROOT, "/missing"),
        PutOp(ROOT, "/b", b"3", if_version=0),
        PutOp(ROOT, "/a", b"4", if_version=1),
        DeleteOp(ROOT, "/b"),
    ]
    engine.gate = threading.Event()  # hold the writer until all six are queued
    blocker = committer.submit(PutOp(ROOT, "/blocker", b""))
    await asyncio.sleep(0.05)
    futures = [committer.submit(op) for op in ops]
    engine.gate.set()
    await blocker
    outcomes = [await future for future in futures]
    assert engine.batches == [1, 6]
    # Revision 1 went to the blocker; the six follow in submission order.
    assert outcomes[0].rev == 2 and outcomes[0].kv is not None
    assert outcomes[0].kv.value == b"1"
    assert isinstance(outcomes[1].error, VersionMismatch)
    assert outcomes[1].error.current_version == 1
    assert isinstance(outcomes[2].error, KeyNotFound)
    assert outcomes[3].rev == 3 and outcomes[3].kv.key == "/b"  # type: ignore[union-attr]
    assert outcomes[4].rev == 4 and outcomes[4].kv.value == b"4"  # type: ignore[union-attr]
    assert outcomes[4].kv.version == 2  # type: ignore[union-attr]
    assert outcomes[5].rev == 5 and outcomes[5].deleted == 1
    # Every future has its own outcome object.
    assert len({id(o) for o in outcomes}) == len(outcomes)


async def test_on_commit_sees_the_changes_before_the_futures_resolve(
        engine: CountingEngine) -> None:
    seen: list[tuple[list[Change], list[bool]]] = []
    futures: list[asyncio.Future[Outcome]] = []

    def on_commit(changes: list[Change]) -> None:
        seen.append((changes, [f.done() for f in futures]))

    committer = Committer(engine, on_commit=on_commit)
    try:
        futures += [committer.submit(PutOp(ROOT, f"/k{i}", b"")) for i in range(5)]
        futures.append(committer.submit(DeleteOp(ROOT, "/nothing")))  # no change
        outcomes = await asyncio.gather(*futures)
        assert len(seen) == 1
        changes, done_then = seen[0]
        assert done_then == [False] * 6
        assert [c.rev for c in changes] == [1, 2, 3, 4, 5]
        assert [c.events[0].key for c in changes] == [f"/k{i}" for i in range(5)]
        assert [o.rev for o in outcomes[:5]] == [1, 2, 3, 4, 5]
    finally:
        committer.close()


async def test_on_settled_runs_after_a_batch_settles_and_before_its_callbacks(
        engine: CountingEngine) -> None:
    events: list[object] = []
    futures: list[asyncio.Future[Outcome]] = []
    committer = Committer(
        engine, on_settled=lambda: events.append(("settled", [f.done() for f in futures])))
    try:
        futures += [committer.submit(PutOp(ROOT, f"/k{i}", b"")) for i in range(3)]
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _, i=i: events.append(("callback", i)))
        await asyncio.gather(*futures)
        await asyncio.sleep(0)
        assert events == [("settled", [True] * 3), ("callback", 0), ("callback", 1),
                          ("callback", 2)]
        # A failed batch settles too.
        events.clear()
        engine.fail_with = KvError("disk on fire")
        failed = committer.submit(PutOp(ROOT, "/k", b""))
        failed.add_done_callback(lambda _: events.append("callback"))
        with pytest.raises(KvError, match="disk on fire"):
            await failed
        await asyncio.sleep(0)
        assert events == [("settled", [True] * 3), "callback"]
    finally:
        committer.close()


async def test_a_failing_on_commit_does_not_lose_the_writes(engine: CountingEngine) -> None:
    def on_commit(changes: list[Change]) -> None:
        raise RuntimeError("subscriber broke")

    committer = Committer(engine, on_commit=on_commit)
    try:
        outcome = await committer.submit(PutOp(ROOT, "/a", b""))
        assert outcome.rev == 1 and outcome.error is None
    finally:
        committer.close()


async def test_storage_full_refuses_the_puts_runs_the_deletes_and_goes_on(
        tmp_path: Path) -> None:
    engine = Engine(tmp_path / "small", [ROOT], map_size=256 * 1024, sync=False)
    committer = Committer(engine)
    try:
        assert (await committer.submit(PutOp(ROOT, "/before", b"x"))).rev == 1
        batch = [committer.submit(PutOp(ROOT, "/a", b"small")),
                 committer.submit(PutOp(ROOT, "/huge", bytes(1 << 20))),
                 committer.submit(DeleteOp(ROOT, "/before"))]
        small, huge, delete = await asyncio.gather(*batch)
        # The puts that did not fit are refused; the delete, which makes room, runs.
        assert isinstance(small.error, StorageFull) and isinstance(huge.error, StorageFull)
        assert small.error is not huge.error
        assert delete.error is None and delete.rev == 2
        assert engine.get(ROOT, "/before")[0] is None
        assert engine.get(ROOT, "/a")[0] is None
        after = await committer.submit(PutOp(ROOT, "/after", b"fits"))
        assert after.rev == 3 and after.error is None
        assert committer.queued == 0
    finally:
        committer.close()
        engine.close()


async def test_an_unexpected_engine_error_fails_the_batch_as_kv_error(
        engine: CountingEngine, committer: Committer) -> None:
    engine.fail_with = OSError(5, "Input/output error")
    results = await asyncio.gather(committer.submit(PutOp(ROOT, "/a", b"")),
                                   committer.submit(PutOp(ROOT, "/b", b"")),
                                   return_exceptions=True)
    assert all(type(r) is KvError for r in results), results
    assert "Input/output error" in str(results[0])
    assert (await committer.submit(PutOp(ROOT, "/c", b""))).rev == 1


async def test_drain_waits_for_queued_writes(engine: CountingEngine,
                                             committer: Committer) -> None:
    futures = [committer.submit(PutOp(ROOT, f"/k{i}", b"")) for i in range(10)]
    await committer.drain()
    assert all(f.done() for f in futures)
    assert engine.revision(ROOT) == 10
