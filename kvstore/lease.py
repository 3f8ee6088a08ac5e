"""Leases: keys that live as long as their writer keeps saying so.

Ephemeral keys die with the writer's XMPP session, which a storage node sees
through presence and pings. A writer whose presence the node cannot see (a
client through another server, a batch job) binds keys to a lease instead:

    async with kv.lease(ttl=10) as lease:
        await kv.put("/jobs/42/owner", b"me", lease=lease)
        ...                     # the library refreshes the lease every ttl/3

When the lease is not refreshed for ``ttl`` seconds, or is revoked (leaving
the ``async with`` block), the node deletes its keys and watchers see the
deletes. Leases live on storage nodes: a Lease object grants one on each node
that holds one of its keys, on first use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.directory import NodeInfo
from kvstore.xmpp import payload_of
from protocol import stanza as wire
from protocol.errors import KvError, LeaseNotFound

if TYPE_CHECKING:
    from kvstore.client import Client

log = logging.getLogger(__name__)


class Lease:
    """A lease of ``ttl`` seconds, kept alive in the background until revoked."""

    def __init__(self, client: Client, ttl: int) -> None:
        if ttl < 1:
            raise ValueError("a lease lasts at least a second")
        self.client = client
        self.ttl = ttl
        self.ids: dict[str, str] = {}
        """Node bare JID -> the lease id that node granted."""
        self.on_lost: list[Callable[[str], None]] = []
        """Called with the node's JID when a node reports the lease gone (its keys too)."""
        self._granting: dict[str, asyncio.Future[str]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self.revoked = False

    async def id_on(self, node: NodeInfo, timeout: float | None = None) -> str:
        """The lease's id on ``node``, granting it there first if need be."""
        if self.revoked:
            raise LeaseNotFound("this lease was revoked")
        if node.bare in self.ids:
            return self.ids[node.bare]
        pending = self._granting.get(node.bare)
        if pending is None:
            pending = asyncio.ensure_future(self._grant(node, timeout))
            self._granting[node.bare] = pending
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._granting.pop(node.bare, None)

    async def _grant(self, node: NodeInfo, timeout: float | None) -> str:
        request = wire.Lease()
        request.set_attrs(action="grant", ttl=self.ttl)
        answer = wire.Lease(xml=payload_of(await self.client._call(node, "set", request,
                                                                   timeout)))
        lease_id = answer.attr("id") or ""
        self.ids[node.bare] = lease_id
        if self._keeper is None:
            self._keeper = asyncio.ensure_future(self._keep_alive())
        return lease_id

    async def _keep_alive(self) -> None:
        while not self.revoked:
            await asyncio.sleep(self.ttl / 3)
            for bare, lease_id, node in self._held_online():
                request = wire.Lease()
                request.set_attrs(action="keepalive", id=lease_id)
                try:
                    await self.client._call(node, "set", request, self.ttl / 3)
                except LeaseNotFound:
                    log.warning("lease %s on %s is gone, and its keys with it", lease_id, bare)
                    self.ids.pop(bare, None)
                    for callback in list(self.on_lost):
                        callback(bare)
                except KvError as error:
                    log.info("keeping lease %s on %s alive failed: %s", lease_id, bare, error)

    def _held_online(self) -> list[tuple[str, str, NodeInfo]]:
        """(node's bare JID, lease id, node) for every node holding the lease and online now."""
        held = []
        for bare, lease_id in list(self.ids.items()):
            node = self.client.directory.nodes.get(bare)
            if node is not None and node.online:
                held.append((bare, lease_id, node))
        return held

    async def revoke(self) -> int:
        """End the lease on every node now; returns how many keys went with it."""
        self.revoked = True
        if self._keeper is not None:
            self._keeper.cancel()
        deleted = 0
        for _bare, lease_id, node in self._held_online():
            request = wire.Lease()
            request.set_attrs(action="revoke", id=lease_id)
            try:
                answer = await self.client._call(node, "set", request, None)
                deleted += wire.Lease(xml=payload_of(answer)).int_attr("deleted", 0) or 0
            except LeaseNotFound:
                pass
        self.ids.clear()
        return deleted

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.revoke()
