"""Live views that re-arm themselves: a snapshot first, then every change.

* :class:`TreeCache` keeps a whole subtree in memory (the agents' shared
  configuration uses it);
* :class:`DataWatch` calls back with one key's value on every change;
* :class:`ChildrenWatch` calls back with a key's children whenever they change.

Each reads a snapshot, then watches from the snapshot's revisions + 1, so no
change between the read and the watch is missed. A watch stream already
resumes by itself across node and server restarts; if history was compacted
away or the shards stay unreachable, the view reads a fresh snapshot (after
a pause) and reports what differs. Unlike ZooKeeper's one-shot watches,
nothing needs re-arming by the application.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kvstore.client import Client
from protocol import keys
from protocol.errors import KvError
from protocol.model import Event, EventType, KeyValue

log = logging.getLogger(__name__)

Listener = Callable[[Event], Awaitable[None] | None]


async def _call(listener: Callable[..., Any], *args: Any) -> None:
    try:
        result = listener(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("a watch callback failed")


class TreeCache:
    """An in-memory copy of a subtree, kept current; ``await cache.start()``."""

    def __init__(self, client: Client, prefix: str, *, retry_delay: float = 1.0) -> None:
        keys.validate(prefix, allow_root=True)
        self.client = client
        self.prefix = prefix
        self.retry_delay = retry_delay
        self.data: dict[str, KeyValue] = {}
        self.listeners: list[Listener] = []
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: Listener) -> None:
        """``listener(event)`` runs after each change is applied to the cache."""
        self.listeners.append(listener)

    def get(self, key: str) -> bytes | None:
        item = self.data.get(key)
        return item.value if item else None

    def relative(self) -> dict[str, bytes]:
        """The subtree as ``{path below the prefix: value}``."""
        cut = 0 if self.prefix == keys.ROOT else len(self.prefix)
        return {key[cut:] or "/": item.value for key, item in self.data.items()}

    async def start(self, timeout: float | None = None) -> TreeCache:
        """Read the snapshot (raising if the store is unreachable), then follow changes."""
        stream = await self._snapshot(notify=False)
        self._task = asyncio.ensure_future(self._follow(stream))
        self.synced.set()
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _snapshot(self, *, notify: bool) -> Any:
        snapshot = await self.client.get_prefix(self.prefix)
        stream = self.client.watch(self.prefix, prefix=True, since=snapshot.next_revisions())
        await stream.start()
        fresh = {item.key: item for item in snapshot.items}
        old, self.data = self.data, fresh
        if notify:
            for key, item in fresh.items():
                if key not in old or old[key].mod_rev != item.mod_rev:
                    await self._notify(Event(EventType.PUT, item, prev=old.get(key)))
            for key, item in old.items():
                if key not in fresh:
                    gone = KeyValue(key, b"", 0, item.create_rev, item.mod_rev)
                    await self._notify(Event(EventType.DELETE, gone, prev=item))
        return stream

    async def _follow(self, stream: Any) -> None:
        while True:
            try:
                async for event in stream:
                    if self._apply(event):
                        await self._notify(event)
            except KvError as error:
                log.info("view of %s lost its watch (%s); reading it afresh", self.prefix, error)
            while True:
                await asyncio.sleep(self.retry_delay)
                try:
                    stream = await self._snapshot(notify=True)
                    break
                except KvError as error:
                    log.info("cannot read %s yet: %s", self.prefix, error)

    def _apply(self, event: Event) -> bool:
        current = self.data.get(event.key)
        # A multi-page snapshot may already hold what the watch replays.
        if current is not None and event.rev <= current.mod_rev:
            return False
        if event.type is EventType.PUT:
            self.data[event.key] = event.kv
        elif current is None:
            return False
        else:
            del self.data[event.key]
        return True

    async def _notify(self, event: Event) -> None:
        for listener in list(self.listeners):
            await _call(listener, event)


class DataWatch:
    """``callback(KeyValue | None)`` now and after every change of one key."""

    def __init__(self, client: Client, key: str,
                 callback: Callable[[KeyValue | None], Awaitable[None] | None]) -> None:
        keys.validate(key)
        self.cache = TreeCache(client, key)
        self.key = key
        self.callback = callback

    async def start(self) -> DataWatch:
        async def changed(event: Event) -> None:
            if event.key == self.key:
                await _call(self.callback, self.cache.data.get(self.key))

        self.cache.add_listener(changed)
        await self.cache.start()
        await _call(self.callback, self.cache.data.get(self.key))
        return self

    async def close(self) -> None:
        await self.cache.close()


class ChildrenWatch:
    """``callback(sorted child names)`` now and whenever the set of children changes."""

    def __init__(self, client: Client, key: str,
                 callback: Callable[[list[str]], Awaitable[None] | None]) -> None:
        keys.validate(key, allow_root=True)
        self.cache = TreeCache(client, key)
        self.key = key
        self.callback = callback
        self.children: list[str] = []

    def _names(self) -> list[str]:
        names = {keys.child_name(self.key, key) for key in self.cache.data
                 if keys.is_strict_prefix(self.key, key)}
        return sorted(names, key=str.encode)

    async def start(self) -> ChildrenWatch:
        async def changed(_: Event) -> None:
            names = self._names()
            if names != self.children:
                self.children = names
                await _call(self.callback, names)

        self.cache.add_listener(changed)
        await self.cache.start()
        self.children = self._names()
        await _call(self.callback, self.children)
        return self

    async def close(self) -> None:
        await self.cache.close()
