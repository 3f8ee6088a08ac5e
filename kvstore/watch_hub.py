"""The watchable store: per-shard change streams pushed to watchers.

Each watch follows one key or one subtree within one shard. A watch starts
*unsynced* when it asks for history: it is fed from the change log in chunks,
paced by the watcher's acknowledgements. Once a chunk reaches the shard's
current revision the watch becomes *synced* and takes new commits as they are
published. Both paths advance the same ``next_rev`` cursor, so no revision is
delivered twice and none is skipped, whatever the interleaving of commits and
log reads (both run on the event loop).

Events travel as IQ sets (:class:`protocol.stanza.Events`). At most ``window``
of them are unacknowledged per watch; what cannot be sent waits in a bounded
buffer. A watcher that lets the buffer overflow gets a ``lagging``
cancellation and resumes from its last revision, which the log serves again:
a slow watcher costs the node bounded memory, never an unbounded queue.
All the changes of one revision go to the watcher together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.storage import Change, Engine
from protocol import keys
from protocol import stanza as wire
from protocol.errors import Compacted, KvError, ResourceLimit, VersionMismatch
from protocol.model import Event

if TYPE_CHECKING:
    from kvstore.xmpp import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchLimits:
    window: int = 4
    """Event pushes a watcher may leave unacknowledged."""
    max_buffered_events: int = 10_000
    max_buffered_bytes: int = 16 << 20
    max_watches_per_watcher: int = 1_000
    ack_timeout: float = 30.0
    progress_interval: float = 5.0
    catch_up_revisions: int = 1_000
    """Log revisions read per catch-up step."""


@dataclass(eq=False)
class Watch:
    id: str
    watcher: str
    shard: str
    key: str
    prefix: bool
    prev_kv: bool
    progress: bool
    next_rev: int
    """The first revision this watch has not examined yet."""
    synced: bool
    buffer: deque[tuple[int, list[Event]]] = field(default_factory=deque)
    buffered_events: int = 0
    buffered_bytes: int = 0
    in_flight: int = 0
    last_push: float = field(default_factory=time.monotonic)
    closed: bool = False
    visible: Callable[[str], bool] = field(default=lambda _key: True)
    """May the watcher read this key? Asked at delivery, so rule changes apply at once."""

    def matches(self, key: str) -> bool:
        if not (keys.is_prefix(self.key, key) if self.prefix else key == self.key):
            return False
        return self.visible(key)

    def select(self, events: list[Event]) -> list[Event]:
        return [event for event in events if self.matches(event.key)]


def _attr_len(text: str) -> int:
    """Bytes ``text`` takes in an XML attribute: UTF-8, with ``& < > "`` escaped."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    return (size + 4 * text.count("&") + 3 * (text.count("<") + text.count(">"))
            + 5 * text.count('"'))


def _event_size(event: Event, with_prev: bool) -> int:
    """Bytes the event takes in a push (the value travels as base64)."""
    size = (len(event.kv.value) + 2) // 3 * 4 + _attr_len(event.kv.key) + 120
    if with_prev and event.prev is not None:
        size += (len(event.prev.value) + 2) // 3 * 4 + _attr_len(event.prev.key) + 100
    return size


class WatchHub:
    """Every watch a node serves, and the pushes that feed them."""

    def __init__(self, engine: Engine, session: Session, *, max_stanza_bytes: int = 200_000,
                 limits: WatchLimits | None = None) -> None:
        self.engine = engine
        self.session = session
        self.limits = limits or WatchLimits()
        self.max_stanza_bytes = max_stanza_bytes
        self._watches: dict[tuple[str, str], Watch] = {}
        self._by_shard: dict[str, set[Watch]] = {}
        self._by_watcher: dict[str, set[Watch]] = {}
        self._progress_task: asyncio.Task[None] | None = None
        self.lagging_cancels = 0

    @property
    def watch_count(self) -> int:
        return len(self._watches)

    def start(self) -> None:
        self._progress_task = asyncio.ensure_future(self._progress_loop())

    def close(self) -> None:
        if self._progress_task is not None:
            self._progress_task.cancel()
        for watch in list(self._watches.values()):
            self._forget(watch)

    # --- registration ---------------------------------------------------

    def create(self, *, watch_id: str, watcher: str, shard: str, key: str, prefix: bool,
               start_rev: int | None, prev_kv: bool = False, progress: bool = False,
               visible: Callable[[str], bool] | None = None) -> Watch:
        if (watcher, watch_id) in self._watches:
            raise VersionMismatch(f"watch id {watch_id!r} is already in use")
        if len(self._by_watcher.get(watcher, ())) >= self.limits.max_watches_per_watcher:
            raise ResourceLimit(
                f"{watcher} already has {self.limits.max_watches_per_watcher} watches"
            )
        current = self.engine.revision(shard)
        compacted = self.engine.compact_revision(shard)
        if start_rev is None or start_rev == 0:
            next_rev, synced = current + 1, True
        elif start_rev <= compacted:
            raise Compacted(
                f"shard {shard} no longer holds revision {start_rev}; the oldest held is "
                f"{compacted + 1}", **{"compact-rev": compacted})
        else:
            next_rev, synced = start_rev, start_rev > current
        watch = Watch(watch_id, watcher, shard, key, prefix, prev_kv, progress, next_rev, synced)
        if visible is not None:
            watch.visible = visible
        self._watches[(watcher, watch_id)] = watch
        self._by_shard.setdefault(shard, set()).add(watch)
        self._by_watcher.setdefault(watcher, set()).add(watch)
        if not synced:
            # After the answer that confirms the watch has gone out.
            asyncio.get_running_loop().call_soon(self._pump, watch)
        return watch

    def cancel(self, watcher: str, watch_id: str) -> bool:
        watch = self._watches.get((watcher, watch_id))
        if watch is None:
            return False
        self._forget(watch)
        return True

    def drop_watcher(self, watcher: str) -> None:
        """The watcher's session ended: end all its watches."""
        for watch in list(self._by_watcher.get(watcher, ())):
            self._forget(watch)

    def _forget(self, watch: Watch) -> None:
        watch.closed = True
        watch.buffer.clear()
        self._watches.pop((watch.watcher, watch.id), None)
        self._by_shard.get(watch.shard, set()).discard(watch)
        mine = self._by_watcher.get(watch.watcher)
        if mine is not None:
            mine.discard(watch)
            if not mine:
                del self._by_watcher[watch.watcher]

    # --- feeding --------------------------------------------------------

    def publish(self, changes: list[Change]) -> None:
        """New commits, in revision order per shard."""
        for change in changes:
            for watch in list(self._by_shard.get(change.shard, ())):
                if not watch.synced or change.rev < watch.next_rev:
                    continue
                watch.next_rev = change.rev + 1
                selected = watch.select(change.events)
                if selected:
                    self._buffer(watch, change.rev, selected)
        for watch in list(self._watches.values()):
            if watch.buffer and watch.in_flight < self.limits.window:
                self._pump(watch)

    def _buffer(self, watch: Watch, rev: int, events: list[Event],
                size: int | None = None) -> None:
        watch.buffer.append((rev, events))
        watch.buffered_events += len(events)
        if size is None:
            size = sum(_event_size(event, watch.prev_kv) for event in events)
        watch.buffered_bytes += size
        # One revision alone is never too much: it is the unit of delivery, and
        # a watcher with nothing else waiting is not behind.
        if len(watch.buffer) > 1 and self._over_limits(watch):
            self.lagging_cancels += 1
            log.info("watch %s of %s is lagging; cancelling it", watch.id, watch.watcher)
            self._end(watch, "lagging")

    def _over_limits(self, watch: Watch, events: int = 0, size: int = 0) -> bool:
        return (watch.buffered_events + events > self.limits.max_buffered_events
                or watch.buffered_bytes + size > self.limits.max_buffered_bytes)

    def _catch_up(self, watch: Watch) -> None:
        """Move one chunk of history from the log into the buffer."""
        try:
            changes, current = self.engine.events(
                watch.shard, watch.next_rev, limit=self.limits.catch_up_revisions,
                with_prev=watch.prev_kv,
                max_bytes=self.max_stanza_bytes * self.limits.window,
            )
        except Compacted:
            self._end(watch, "compacted")
            return
        for change in changes:
            selected = watch.select(change.events)
            size = sum(_event_size(event, watch.prev_kv) for event in selected)
            if watch.buffer and self._over_limits(watch, len(selected), size):
                break  # the buffer is full: read on once it has drained
            watch.next_rev = change.rev + 1
            if selected:
                self._buffer(watch, change.rev, selected, size)
                if watch.closed:
                    return
        if watch.next_rev > current:
            watch.synced = True

    def _pump(self, watch: Watch) -> None:
        while not watch.closed and watch.in_flight < self.limits.window:
            if not watch.buffer:
                if watch.synced:
                    return
                self._catch_up(watch)
                if watch.closed or (not watch.buffer and watch.synced):
                    return
                if not watch.buffer:
                    # A stretch of history with nothing for this watch: read
                    # on, but let other work run between chunks.
                    asyncio.get_running_loop().call_soon(self._pump, watch)
                    return
            self._push_batch(watch)

    def _push_batch(self, watch: Watch) -> None:
        payload = wire.Events()
        batch: list[Event] = []
        budget = self.max_stanza_bytes
        last_rev = 0
        more = False
        while watch.buffer:
            rev, events = watch.buffer[0]
            sizes = [_event_size(event, watch.prev_kv) for event in events]
            if sum(sizes) > budget and last_rev:
                break  # the next revision goes whole into the next push
            taken = 0
            for _event, size in zip(events, sizes, strict=True):
                if budget - size < 0 and taken:
                    break
                budget -= size
                taken += 1
            batch.extend(events[:taken])
            watch.buffered_events -= taken
            watch.buffered_bytes -= sum(sizes[:taken])
            last_rev = rev
            if taken < len(events):
                watch.buffer[0] = (rev, events[taken:])
                more = True
                break
            watch.buffer.popleft()
        if not more and not watch.buffer:
            last_rev = watch.next_rev - 1
        payload.set_events(batch, with_prev=watch.prev_kv)
        payload.set_attrs(watch=watch.id, shard=watch.shard, rev=last_rev, more=more)
        self._send(watch, payload)

    def _send(self, watch: Watch, payload: wire.Events) -> None:
        iq = self.session.iq(watch.watcher, "set", payload.xml)
        watch.in_flight += 1
        watch.last_push = time.monotonic()
        future = self.session.send_iq(iq, self.limits.ack_timeout)
        future.add_done_callback(lambda done: self._acked(watch, done))

    def _acked(self, watch: Watch, done: asyncio.Future[object]) -> None:
        watch.in_flight -= 1
        error = done.exception()
        if error is not None:
            if not watch.closed:
                log.info("dropping watch %s of %s: %s", watch.id, watch.watcher, error)
                self._forget(watch)
            return
        if not watch.closed:
            self._pump(watch)

    def _end(self, watch: Watch, reason: str) -> None:
        """Cancel a watch on the node's initiative and tell the watcher why."""
        resume = watch.next_rev
        if watch.buffer:
            resume = watch.buffer[0][0]
        self._forget(watch)
        payload = wire.Events()
        payload.set_attrs(watch=watch.id, shard=watch.shard, rev=resume - 1, cancelled=reason)
        iq = self.session.iq(watch.watcher, "set", payload.xml)
        future = self.session.send_iq(iq, self.limits.ack_timeout)
        future.add_done_callback(_ignore_result)

    # --- progress ---------------------------------------------------------

    async def _progress_loop(self) -> None:
        interval = self.limits.progress_interval
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for watch in list(self._watches.values()):
                if (watch.progress and watch.synced and not watch.buffer
                        and watch.in_flight == 0 and now - watch.last_push >= interval):
                    payload = wire.Events()
                    payload.set_attrs(watch=watch.id, shard=watch.shard, rev=watch.next_rev - 1)
                    self._send(watch, payload)


def _ignore_result(done: asyncio.Future[object]) -> None:
    if not done.cancelled() and isinstance(done.exception(), KvError):
        log.debug("a cancellation notice went unanswered: %s", done.exception())
