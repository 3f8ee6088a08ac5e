"""Resources, the matching rule, and where the registry keeps them.

A resource is a key-like path (``/cluster/ey04``, ``/slice/13``, ``/``).
Matching is segment-wise and goes both ways, as in Vertebra: a provider of
``/cluster/ey04`` answers a query for ``/cluster/ey04/slice/13`` and a
provider of ``/cluster/ey04/slice/13`` answers a query for ``/cluster/ey04``;
``/`` matches everything; ``/cluster/ey04`` never matches ``/cluster/ey040``.
Several resources in one query are ANDed: an agent matches if each queried
resource is matched by one of the resources it provides.

The registry lives in the store, under ``/sys`` by default::

    /sys/agents/<jid>                          the agent's description (JSON)
    /sys/resources/<resource...>/@/<jid>       one entry per provided resource

All of them are ephemeral: they die with the agent's session. ``<jid>`` is
the agent's full JID with ``%`` and ``/`` percent-encoded; ``@`` is a segment
reserved to mark where a resource ends, so no resource may contain it.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol import keys
from protocol.errors import InvalidKey

MARKER = "@"
DEFAULT_ROOT = "/sys"


def validate_resource(resource: str) -> str:
    keys.validate(resource, allow_root=True)
    if MARKER in keys.segments(resource):
        raise InvalidKey(f"resource {resource!r} uses the reserved segment {MARKER!r}")
    return resource


def matches_one(provided: str, wanted: str) -> bool:
    return keys.overlaps(provided, wanted)


def matches(provided: Iterable[str], query: Iterable[str]) -> bool:
    """Does an agent providing ``provided`` answer a query for all of ``query``?"""
    offered = list(provided)
    return all(any(matches_one(p, q) for p in offered) for q in query)


def encode_jid(jid: str) -> str:
    return keys.escape_segment(jid)


def decode_jid(segment: str) -> str:
    return keys.unescape_segment(segment)


class RegistryLayout:
    """Key names of the registry under one root."""

    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        keys.validate(root)
        self.root = root
        self.agents = keys.join(root, "agents")
        self.resources = keys.join(root, "resources")

    def agent_key(self, jid: str) -> str:
        return keys.join(self.agents, encode_jid(jid))

    def resource_base(self, resource: str) -> str:
        """The registry key that mirrors ``resource``."""
        return keys.join(self.resources, *keys.segments(resource))

    def provider_key(self, resource: str, jid: str) -> str:
        return keys.join(self.resource_base(resource), MARKER, encode_jid(jid))

    def parse_provider_key(self, key: str) -> tuple[str, str] | None:
        """(resource, jid) for a provider entry, None for any other key."""
        below = keys.segments(key)[len(keys.segments(self.resources)):]
        if len(below) < 2 or below[-2] != MARKER:
            return None
        return keys.join(keys.ROOT, *below[:-2]), decode_jid(below[-1])
