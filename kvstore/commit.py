"""Group commit: writes that arrive together share one transaction and one fsync.

A synced LMDB commit costs a fraction of a millisecond of fsync, so one commit
per write caps a node at a few thousand writes a second. A dedicated writer
thread commits in a loop: while one commit is on disk new writes queue, and
the next commit takes all of them at once, without waiting for the event loop
to hand it the batch. Each write is acknowledged only after the commit that
holds it has returned, so an acknowledged write survives ``kill -9``.
Results go back to the event loop in commit order, so watchers see the
changes in revision order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

from kvstore.storage import Change, Engine, Outcome, WriteOp
from protocol.errors import KvError

log = logging.getLogger(__name__)

Entry = tuple[WriteOp, asyncio.Future[Outcome]]


class Committer:
    """Queues write ops and commits them in batches on one writer thread."""

    def __init__(self, engine: Engine, *, max_batch: int = 1000,
                 on_commit: Callable[[list[Change]], None] | None = None,
                 on_settled: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.on_commit = on_commit
        """Called with a commit's changes before its writes' futures are settled."""
        self.on_settled = on_settled
        """Called once a batch's futures are settled, before their callbacks run."""
        self._inbox: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="kv-commit", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.commits = 0
        self.ops = 0
        self.commit_seconds = 0.0

    @property
    def queued(self) -> int:
        """Writes submitted and not yet answered."""
        return self._pending

    def submit(self, op: WriteOp) -> asyncio.Future[Outcome]:
        """Queue ``op``; the future resolves once it is durable (or failed)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._thread.start()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._pending += 1
        self._idle.clear()
        self._inbox.put((op, future))
        return future

    # --- the writer thread ------------------------------------------------

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    entry = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if entry is None:
                    stopping = True
                    break
                batch.append(entry)
            started = time.perf_counter()
            outcomes: list[Outcome] | None = None
            error: BaseException | None = None
            try:
                outcomes = self.engine.apply([op for op, _ in batch])
            except BaseException as exc:
                error = exc
            self.commit_seconds += time.perf_counter() - started
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._finish, batch, outcomes, error)
            except RuntimeError:
                return  # the event loop is gone: nobody is waiting any more

    # --- back on the event loop -------------------------------------------

    def _finish(self, batch: list[Entry], outcomes: list[Outcome] | None,
                error: BaseException | None) -> None:
        if error is not None or outcomes is None:
            if not isinstance(error, KvError):
                log.error("commit failed", exc_info=error)
                error = KvError(f"commit failed: {error}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(type(error)(str(error), **error.details))
        else:
            self.commits += 1
            self.ops += len(batch)
            if self.on_commit is not None:
                changes = [change for outcome in outcomes for change in outcome.changes]
                if changes:
                    try:
                        self.on_commit(changes)
                    except Exception:
                        log.exception("publishing committed changes failed")
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
        self._pending -= len(batch)
        if self._pending == 0:
            self._idle.set()
        if self.on_settled is not None:
            self.on_settled()

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued write is committed."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    def close(self) -> None:
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(10)
