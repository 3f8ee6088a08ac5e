"""The resource registry: agents register what they provide; callers look it up.

Registration writes one ephemeral key per provided resource plus a
description (see :mod:`agent.resources` for the layout). Discovery is a
lookup in that index, never a scan of every agent: for a query ``Q`` it reads
the providers registered exactly at each ancestor of ``Q`` (one small list
per level) and the subtree of the index below ``Q``. A provider disappears
from discovery as soon as its ephemeral keys go, that is as soon as the
storage node learns its session ended.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from agent.resources import MARKER, RegistryLayout, decode_jid, validate_resource
from kvstore.client import Client
from protocol import keys
from protocol.errors import KeyNotFound


class Registry:
    """Registration and discovery of agents, through a store client."""

    def __init__(self, client: Client, layout: RegistryLayout | None = None) -> None:
        self.client = client
        self.layout = layout or RegistryLayout()

    async def register(self, jid: str, resources: list[str], description: dict[str, Any],
                       *, timeout: float | None = None) -> None:
        """Write the agent's entries, bound to the current session.

        One transaction per shard: discovery never sees part of a shard's
        entries, and hundreds of agents starting at once cost the node one
        write each instead of one per resource.
        """
        for resource in resources:
            validate_resource(resource)
        entries: dict[str, bytes | str] = {self.layout.agent_key(jid): json.dumps(description)}
        entries.update({self.layout.provider_key(resource, jid): b"" for resource in resources})
        await self.client.put_many(entries, ephemeral=True, timeout=timeout)

    async def unregister(self, jid: str, resources: list[str],
                         *, timeout: float | None = None) -> None:
        deletes = [self.layout.agent_key(jid)]
        deletes += [self.layout.provider_key(resource, jid) for resource in resources]
        results = await asyncio.gather(
            *(self.client.delete(key, timeout=timeout) for key in deletes),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, KeyNotFound):
                raise result

    async def providers(self, resource: str, *, timeout: float | None = None) -> set[str]:
        """JIDs of agents whose resources match ``resource`` (either way, segment-wise)."""
        validate_resource(resource)
        base = self.layout.resource_base(resource)
        ancestors = []
        current = resource
        while current != keys.ROOT:
            current = keys.parent(current)
            ancestors.append(current)
        below, *above = await asyncio.gather(
            self.client.get_prefix(base, keys_only=True, timeout=timeout),
            *(self.client.list(keys.join(self.layout.resource_base(a), MARKER), timeout=timeout)
              for a in ancestors),
        )
        found = set()
        for item in below.items:
            parsed = self.layout.parse_provider_key(item.key)
            if parsed is not None:
                found.add(parsed[1])
        for listing in above:
            found.update(decode_jid(name) for name in listing.names)
        return found

    async def discover(self, *resources: str, timeout: float | None = None) -> list[str]:
        """Sorted JIDs of the agents matching every one of ``resources`` (all agents if none)."""
        if not resources:
            resources = (keys.ROOT,)
        sets = await asyncio.gather(*(self.providers(r, timeout=timeout) for r in resources))
        return sorted(set.intersection(*sets))

    async def describe(self, jid: str, *, timeout: float | None = None) -> dict[str, Any]:
        item = await self.client.get(self.layout.agent_key(jid), timeout=timeout)
        return json.loads(item.value)

    async def agents(self, *, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Every registered agent and its description."""
        listing = await self.client.get_prefix(self.layout.agents, timeout=timeout)
        found = {}
        for item in listing.items:
            try:
                description = json.loads(item.value)
            except ValueError:
                continue
            found[description.get("jid", item.key)] = description
        return found

