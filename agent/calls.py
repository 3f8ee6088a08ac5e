"""Calling operations on agents: one agent (``single``) or every match (``all``).

Each target costs exactly one request stanza and one answer stanza. With
``scope="all"`` the requests go out together and replies are yielded as they
arrive; when the timeout comes, every target that has not answered is
reported with a Timeout error, so a hung agent delays nobody past it. With
``scope="single"`` the matching agents are tried one after the other until
one succeeds.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from agent.registry import Registry
from kvstore.client import Client
from kvstore.xmpp import payload_of
from protocol.agent import Call
from protocol.errors import KeyNotFound, KvError, Timeout

Scope = Literal["single", "all"]


class NoProvider(KeyNotFound):
    """No registered agent matches the resources asked for."""

    condition = "no-provider"


@dataclass(frozen=True)
class Reply:
    jid: str
    result: Any = None
    error: KvError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Caller:
    """Scatter operations to agents and gather their replies."""

    def __init__(self, client: Client, registry: Registry | None = None) -> None:
        self.client = client
        self.registry = registry or Registry(client)

    async def discover(self, *resources: str, timeout: float | None = None) -> list[str]:
        return await self.registry.discover(*resources, timeout=timeout)

    def _send(self, jid: str, op: str, args: dict[str, Any], timeout: float
              ) -> asyncio.Future[Any]:
        request = Call()
        request.op = op
        request.payload = args
        iq = self.client.session.iq(jid, "set", request.xml)
        return self.client.session.send_iq(iq, timeout)

    async def call(self, op: str, *resources: str, args: dict[str, Any] | None = None,
                   scope: Scope = "all", timeout: float = 5.0) -> AsyncIterator[Reply]:
        """Replies from the agents matching ``resources``, as they arrive."""
        if scope not in ("single", "all"):
            raise ValueError(f"scope must be 'single' or 'all', not {scope!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        targets = await self.discover(*resources, timeout=timeout)
        if not targets:
            raise NoProvider(f"no agent provides {' and '.join(resources) or '/'}")
        arguments = dict(args or {})
        if scope == "single":
            random.shuffle(targets)
            last: Reply | None = None
            for jid in targets:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    answer = await self._send(jid, op, arguments, remaining)
                    yield Reply(jid, Call(xml=payload_of(answer)).payload)
                    return
                except KvError as error:
                    last = Reply(jid, error=error)
            yield last or Reply(targets[0], error=Timeout(f"no agent answered within {timeout}s"))
            return

        pending = {self._send(jid, op, arguments, max(deadline - loop.time(), 0.001)): jid
                   for jid in targets}
        for finished in asyncio.as_completed(list(pending)):
            try:
                answer = await finished
            except KvError as error:
                # as_completed hides which future finished; match it by identity.
                yield Reply(_owner(pending, error), error=error)
                continue
            yield Reply(str(answer.get("from")), Call(xml=payload_of(answer)).payload)

    async def gather(self, op: str, *resources: str, args: dict[str, Any] | None = None,
                     scope: Scope = "all", timeout: float = 5.0) -> list[Reply]:
        """Every reply (or per-target error), sorted by JID."""
        replies = [reply async for reply in self.call(op, *resources, args=args, scope=scope,
                                                      timeout=timeout)]
        return sorted(replies, key=lambda reply: reply.jid)


def _owner(pending: dict[asyncio.Future[Any], str], error: BaseException) -> str:
    for future, jid in pending.items():
        if future.done() and not future.cancelled() and future.exception() is error:
            return jid
    return "?"
