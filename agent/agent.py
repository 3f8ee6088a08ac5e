"""The agent: one XMPP session that hosts actors, registers them, answers calls.

    agent = Agent(settings, name="web1", actors=[Slice("/cluster/ey04", "/slice/13")])
    await agent.start()          # connect, register every resource, serve calls
    web = await agent.config("/config/web")    # a live view, current through a watch
    web.add_listener(apply_change)
    ...
    await agent.stop()

Presence stays linear in the number of agents: an agent exchanges presence
only with the storage nodes (which must see its session to keep its
ephemeral registry entries alive), never with other agents. Calls come as
one IQ each and get one answer each.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.actor import Actor
from agent.builtin import SysActor
from agent.registry import Registry
from agent.resources import RegistryLayout
from kvstore.client import Client
from kvstore.config import ConnectionSettings
from kvstore.recipe import DataWatch, TreeCache
from kvstore.xmpp import Inbound
from protocol import agent as wire
from protocol.errors import BadRequest, KvError, ResourceLimit
from protocol.model import KeyValue

log = logging.getLogger(__name__)

_CALL_TAG = f"{{{wire.NS}}}call"


class Agent:
    """Hosts actors on one XMPP session and keeps them registered."""

    def __init__(self, settings: ConnectionSettings, *, name: str,
                 actors: Iterable[Actor] = (), registry_root: str = "/sys",
                 resource: str = "agent", max_in_flight: int = 64) -> None:
        self.name = name
        self.client = Client(settings, resource=resource)
        self.session = self.client.session
        self.registry = Registry(self.client, RegistryLayout(registry_root))
        self.actors: list[Actor] = [SysActor(self), *actors]
        self.operations: dict[str, Callable[..., Any]] = {}
        for actor in self.actors:
            for op_name, method in actor.operations().items():
                if op_name in self.operations:
                    raise ValueError(f"two actors define the operation {op_name!r}")
                self.operations[op_name] = method
        self.resources = sorted({r for actor in self.actors for r in actor.resources},
                                key=str.encode)
        self.max_in_flight = max_in_flight
        self.started = time.time()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.views: list[TreeCache] = []
        """Live views of shared configuration, from :meth:`config`."""
        self._own_watches: list[DataWatch] = []
        self._reregistering = False
        self._again = False
        self._registered = False
        self._stopping = False
        self.session.route(_CALL_TAG, self._on_call)
        self.session.on_start.append(self._on_session_start)

    @property
    def jid(self) -> str:
        return str(self.session.jid)

    def description(self) -> dict[str, Any]:
        return {
            "jid": self.jid,
            "name": self.name,
            "resources": self.resources,
            "operations": sorted(self.operations),
            "started": self.started,
        }

    # --- life cycle -----------------------------------------------------

    async def start(self, timeout: float | None = None) -> Agent:
        """Connect, register every resource, and start serving calls."""
        await self.client.connect(timeout)
        await self.register()
        self._own_watches = [DataWatch(self.client, key, self._on_own_entry)
                             for key in self._sentinels()]
        await asyncio.gather(*(watch.start() for watch in self._own_watches))
        return self

    def _sentinels(self) -> list[str]:
        """One of the agent's own keys per shard they are in.

        A node that takes a session for dead deletes all of its ephemeral keys
        in one transaction, so one watched key per shard tells of it: a
        thousand agents cost the node a watch or two each, not one per
        resource.
        """
        layout = self.registry.layout
        own = [layout.agent_key(self.jid)]
        own += [layout.provider_key(resource, self.jid) for resource in self.resources]
        by_shard: dict[str, str] = {}
        for key in own:
            by_shard.setdefault(self.client.directory.shard_of(key), key)
        return list(by_shard.values())

    async def register(self) -> None:
        await self.registry.register(self.jid, self.resources, self.description())
        self._registered = True

    async def stop(self) -> None:
        """Unregister (so discovery forgets the agent at once) and disconnect."""
        self._stopping = True
        for watch in self._own_watches:
            await watch.close()
        for view in self.views:
            await view.close()
        for task in list(self._tasks):
            task.cancel()
        if self._registered:
            try:
                await self.registry.unregister(self.jid, self.resources, timeout=2.0)
            except KvError as error:
                log.info("could not unregister (the keys expire with the session): %s", error)
        await self.client.close()

    async def __aenter__(self) -> Agent:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def _on_session_start(self) -> None:
        # After a reconnect the old session's keys may be gone: write them again.
        if self._registered and not self._stopping:
            self._spawn(self._reregister("reconnected"))

    def _on_own_entry(self, entry: KeyValue | None) -> None:
        # A node deletes an agent's keys when it takes the agent for dead (a
        # long pause, a lost session). If the agent is in fact alive, it says so.
        if entry is None and self._registered and not self._stopping:
            self._spawn(self._reregister("registry entry vanished"))

    async def _reregister(self, why: str) -> None:
        if self._reregistering:
            self._again = True  # a deletion raced with the write in progress
            return
        self._reregistering = True
        delay = 0.2
        try:
            while not self._stopping:
                try:
                    self._again = False
                    await self.register()
                    log.info("registered again (%s)", why)
                    if not self._again:
                        return
                except KvError as error:
                    log.info("registering again failed (%s); retrying", error)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            self._reregistering = False

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- shared configuration -----------------------------------------------

    async def config(self, prefix: str) -> TreeCache:
        """A live view of the subtree ``prefix``: a snapshot, then every change."""
        view = TreeCache(self.client, prefix)
        await view.start()
        self.views.append(view)
        return view

    # --- calls ------------------------------------------------------------

    def _on_call(self, call: Inbound) -> None:
        try:
            if call.type != "set":
                raise BadRequest("a call is an IQ set")
            request = wire.Call(xml=call.payload)
            op = request.op
            function = self.operations.get(op)
            if function is None:
                raise wire.UnknownOperation(f"{self.jid} has no operation {op!r}")
            args = request.payload
            if args is None:
                args = {}
            if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
                raise BadRequest("operation arguments must be a map of names to values")
            try:
                inspect.signature(function).bind(**args)
            except TypeError as error:
                raise BadRequest(f"bad arguments for {op}: {error}") from None
            if self._in_flight >= self.max_in_flight:
                raise ResourceLimit(f"{self.jid} is running {self._in_flight} operations")
        except KvError as error:
            self.session.reply_error(call, error)
            return
        self._in_flight += 1
        self._spawn(self._run(call, op, function, args))

    async def _run(self, call: Inbound, op: str, function: Callable[..., Any],
                   args: dict[str, Any]) -> None:
        try:
            result = function(**args)
            if inspect.isawaitable(result):
                result = await result
            response = wire.Call()
            response.op = op
            response.payload = result
        except KvError as error:
            self.session.reply_error(call, error)
        except Exception as error:
            log.info("operation %s failed: %s", op, error)
            self.session.reply_error(call, wire.OperationFailed(f"{type(error).__name__}: {error}"))
        else:
            self.session.reply(call, response.xml)
        finally:
            self._in_flight -= 1
