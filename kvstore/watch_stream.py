"""Client side of watches: one ordered, gap-free stream over any number of shards.

A :class:`WatchStream` subscribes to every shard its key or subtree spans
and keeps, per shard, the next revision it wants. Whatever ends a
subscription (the node restarts, the XMPP server restarts, this client
reconnects, the node cancels a lagging watch) the stream subscribes again
from that revision as soon as a node serving the shard is online, and drops
anything it has already delivered. The application therefore sees each
change exactly once, in revision order per shard, with every change of one
revision together.

Back-pressure: pushes are acknowledged only while the stream's queue is
short. An application that stops reading stops acknowledging; the node's
buffer for it fills and the node cancels the watch as lagging; the stream
resumes from its last revision when the application catches up. Memory stays
bounded on both sides.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.directory import NodeInfo
from kvstore.xmpp import Inbound, payload_of
from protocol import keys
from protocol import stanza as wire
from protocol.errors import BadRequest, Compacted, KvError, NotOwner, Unavailable
from protocol.model import Event

if TYPE_CHECKING:
    from kvstore.client import Client

log = logging.getLogger(__name__)

_EVENTS_TAG = f"{{{wire.NS}}}events"
HIGH_WATER = 1000
"""Queued events above which pushes are no longer acknowledged."""


@dataclass(eq=False)
class _ShardSub:
    """The stream's subscription to one shard."""

    shard: str
    resume: int | None
    """The next revision wanted; None until the first subscription says where "now" is."""
    watch_id: str | None = None
    node_jid: str | None = None
    subscribing: bool = False
    lost_since: float | None = None
    partial: list[Event] = field(default_factory=list)


class WatchStream:
    """Changes to a key or a subtree; iterate with ``async for``."""

    _ids = itertools.count(1)

    def __init__(self, client: Client, key: str, *, prefix: bool,
                 since: int | Mapping[str, int] | None, prev_kv: bool,
                 unavailable_timeout: float | None) -> None:
        self.client = client
        self.key = key
        self.prefix = prefix
        self.since = since
        self.prev_kv = prev_kv
        self.unavailable_timeout = unavailable_timeout
        self.subs: dict[str, _ShardSub] = {}
        self._queue: deque[Event] = deque()
        self._held_acks: list[Inbound] = []
        self._wakeup = asyncio.Event()
        self._error: BaseException | None = None
        self._started = False
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.resubscriptions = 0

    # --- wiring into the client --------------------------------------------

    # --- public ---------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def __aenter__(self) -> WatchStream:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def revisions(self) -> dict[str, int]:
        """Shard -> the next revision this stream will deliver (to resume it later)."""
        return {shard: sub.resume for shard, sub in self.subs.items() if sub.resume is not None}

    async def start(self) -> None:
        """Subscribe to every shard of the key or subtree.

        Raises Unavailable if no node serving the key's own shard is online.
        A deeper shard (of a prefix watch) whose node is offline is taken up
        as soon as its node comes back, from the revision it announces then;
        it counts towards ``unavailable_timeout`` meanwhile.
        """
        if self._started:
            return
        self._started = True
        directory = self.client.directory
        if not directory.complete:
            await directory.ready(self.client.timeout)
        top = directory.shard_of(self.key)
        shards = directory.subtree(self.key) if self.prefix else [top]
        for shard in shards:
            self.subs[shard] = _ShardSub(shard, self._since(shard))
        self.client.watches.open.add(self)
        try:
            await asyncio.gather(*(self._subscription(sub, strict=sub.shard == top)
                                   for sub in self.subs.values()))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Cancel the watch on every node; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.client.watches.open.discard(self)
        for task in self._tasks:
            task.cancel()
        for push in self._held_acks:
            self.client.session.reply(push)
        self._held_acks.clear()
        for sub in self.subs.values():
            if sub.watch_id and sub.node_jid and self.client.session.online.is_set():
                request = wire.Cancel()
                request.set_attrs(id=sub.watch_id)
                iq = self.client.session.iq(sub.node_jid, "set", request.xml)
                self.client.session.send_iq(iq, 2.0).add_done_callback(_quiet)
            self._unroute(sub)
        self._wakeup.set()

    # --- the consumer side ------------------------------------------------

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; TimeoutError if none comes in time (the stream stays open).

        Raises StopAsyncIteration once the stream is closed, and whatever ended
        it otherwise (Unavailable, Compacted).
        """
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._queue:
                event = self._queue.popleft()
                if self._held_acks and len(self._queue) < HIGH_WATER // 2:
                    for push in self._held_acks:
                        self.client.session.reply(push)
                    self._held_acks.clear()
                return event
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            wait = 0.5
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    raise TimeoutError(f"no event within {timeout:g}s")
            self._wakeup.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
            except TimeoutError:
                self._check_unavailable()

    async def _iterate(self) -> AsyncIterator[Event]:
        try:
            while True:
                try:
                    event = await self.next()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            await self.close()

    def _check_unavailable(self) -> None:
        if self.unavailable_timeout is None:
            return
        now = time.monotonic()
        for sub in self.subs.values():
            if sub.lost_since is not None and now - sub.lost_since > self.unavailable_timeout:
                self._error = Unavailable(
                    f"no storage node serving shard {sub.shard} has been reachable for "
                    f"{now - sub.lost_since:.0f}s"
                )
                return

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wakeup.set()

    # --- subscriptions --------------------------------------------------

    def _since(self, shard: str) -> int | None:
        if self.since is None:
            return None
        if isinstance(self.since, Mapping):
            return self.since.get(shard)
        return int(self.since)

    def _unroute(self, sub: _ShardSub) -> None:
        if sub.watch_id is not None:
            self.client.watches.routes.pop(sub.watch_id, None)
        sub.watch_id = None
        sub.node_jid = None
        sub.partial.clear()

    def _lose(self, sub: _ShardSub) -> None:
        self._unroute(sub)
        if sub.lost_since is None:
            sub.lost_since = time.monotonic()

    def _spawn_subscribe(self, sub: _ShardSub) -> None:
        if self._closed or sub.subscribing or sub.watch_id is not None:
            return
        task = asyncio.ensure_future(self._subscription(sub, strict=False))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _subscription(self, sub: _ShardSub, *, strict: bool) -> Coroutine[Any, Any, None]:
        """Subscribe ``sub`` (awaited, or run as a task).

        The subscription counts as under way from this call on, not from when
        the coroutine first runs: a node's presence handled in between would
        otherwise start a second one for the same shard, and the node would
        keep the first watch for nothing (counted against the watcher's limit).
        """
        sub.subscribing = True
        return self._subscribe(sub, strict=strict)

    async def _subscribe(self, sub: _ShardSub, *, strict: bool) -> None:
        try:
            asked = await self._subscribe_once(sub, strict=strict)
        finally:
            sub.subscribing = False
        # The node went away or came back as a new session while the request
        # was out: the presence that told us found this subscription under way
        # and left it alone, so take it up with the node's session of now.
        if sub.watch_id is None and not self._closed and self._error is None:
            node = self.client.directory.owner(sub.shard)
            if node is not None and node.jid is not None and node.jid != asked:
                self._spawn_subscribe(sub)

    async def _subscribe_once(self, sub: _ShardSub, *, strict: bool) -> str | None:
        """One watch request; returns the node session it was sent to."""
        node = self.client.directory.owner(sub.shard)
        if node is None or node.jid is None:
            self._lose(sub)
            if strict:
                raise Unavailable(f"no storage node serving shard {sub.shard} is online")
            return None
        asked = node.jid  # the directory updates ``node`` in place when its session changes
        watch_id = f"{self.client.session.jid.resource}-{secrets.token_hex(2)}-{next(self._ids)}"
        sub.watch_id, sub.node_jid = watch_id, asked
        self.client.watches.routes[watch_id] = (self, sub)
        request = wire.Watch()
        request.set_attrs(id=watch_id, key=self.key, shard=sub.shard, prefix=self.prefix,
                          start_rev=sub.resume, prev_kv=self.prev_kv, progress=True)
        try:
            result = await self.client._call(node, "set", request, None)
        except Compacted as error:
            self._unroute(sub)
            self._fail(error)
            if strict:
                raise
            return asked
        except NotOwner as error:
            self.client.directory.learn_shard(error.shard)
            self._lose(sub)
            self._fail(Unavailable(f"shard {sub.shard} moved: {error}"))
            if strict:
                raise Unavailable(str(error)) from None
            return asked
        except KvError as error:
            self._lose(sub)
            if strict:
                raise
            log.info("resubscribing to %s failed: %s", sub.shard, error)
            return asked
        if sub.watch_id != watch_id:
            return asked  # lost again while subscribing
        started = wire.Watch(xml=payload_of(result)).int_attr("start-rev", 0)
        if sub.resume is None:
            sub.resume = started
        sub.lost_since = None
        self.resubscriptions += 1
        return asked

    # --- pushes -----------------------------------------------------------

    def _on_push(self, sub: _ShardSub, payload: wire.Events, push: Inbound) -> None:
        session = self.client.session
        cancelled = payload.attr("cancelled")
        if cancelled:
            session.reply(push)
            self._unroute(sub)
            if cancelled == "compacted":
                self._fail(Compacted(f"shard {sub.shard} compacted past revision {sub.resume}"))
            else:
                log.info("watch on %s cancelled by the node (%s); resuming from %s",
                         sub.shard, cancelled, sub.resume)
                self._spawn_subscribe(sub)
            return
        rev = payload.int_attr("rev", 0) or 0
        for event in payload.events():
            if sub.resume is None or event.rev >= sub.resume:
                sub.partial.append(event)
        if not payload.bool_attr("more"):
            self._queue.extend(sub.partial)
            sub.partial.clear()
            sub.resume = max(sub.resume or 0, rev + 1)
        self._wakeup.set()
        if len(self._queue) < HIGH_WATER:
            session.reply(push)
        else:
            self._held_acks.append(push)


class WatchRegistry:
    """A client's open streams, and the routing of pushes and presence to them."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.routes: dict[str, tuple[WatchStream, _ShardSub]] = {}
        """Watch id (on the node) -> the stream and shard subscription it feeds."""
        self.open: set[WatchStream] = set()
        client.session.route(_EVENTS_TAG, self._on_push)
        client.directory.listeners.append(self._on_node)
        client.session.on_stop.append(self._on_session_lost)

    async def close(self) -> None:
        for stream in list(self.open):
            await stream.close()

    def _on_push(self, push: Inbound) -> None:
        payload = wire.Events(xml=push.payload)
        watch_id = payload.attr("watch") or ""
        stream, sub = self.routes.get(watch_id, (None, None))
        if stream is None or sub is None or sub.watch_id != watch_id or \
                push.sender != sub.node_jid:
            self.client.session.reply_error(push, KvError(f"no watch {watch_id!r} here"))
            return
        if push.type != "set":
            self.client.session.reply_error(push, BadRequest("pushes are IQ sets"))
            return
        try:
            stream._on_push(sub, payload, push)
        except KvError as error:
            self.client.session.reply_error(push, error)

    def _on_node(self, node: NodeInfo) -> None:
        for stream in list(self.open):
            if stream._closed or not stream._started:
                continue
            for sub in stream.subs.values():
                if sub.node_jid is not None and sub.node_jid != node.jid and \
                        sub.node_jid.split("/")[0] == node.bare:
                    stream._lose(sub)  # its node went away, or came back as a new session
            if not node.online:
                continue
            for shard, announced in node.shards.items():
                sub = stream.subs.get(shard)
                if sub is not None and sub.resume is None and not sub.subscribing:
                    # Never subscribed yet: it has taken nothing since it announced.
                    # (A first subscription under way starts from the node's
                    # current revision, as a new watch should.)
                    sub.resume = announced + 1
                if sub is None:
                    if not (stream.prefix and keys.is_strict_prefix(stream.key, shard)):
                        continue
                    # A shard that appeared under the watched subtree: all it
                    # has taken since it announced itself is new to us.
                    sub = _ShardSub(shard, announced + 1, lost_since=time.monotonic())
                    stream.subs[shard] = sub
                stream._spawn_subscribe(sub)

    def _on_session_lost(self) -> None:
        for stream in list(self.open):
            for sub in stream.subs.values():
                stream._lose(sub)


def _quiet(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()
