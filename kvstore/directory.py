"""Who serves what: the client's view of the storage nodes, kept by presence.

Each client subscribes to the presence of the storage nodes its config names
(an ordinary roster subscription, RFC 6121, which the nodes approve). A node's
presence carries the shards it serves, so a client learns at once, with no
polling, when a node comes online and when it goes away: the XMPP server
sends the unavailable presence the moment the node's stream ends, and answers
the client's own login with the current presence of every node (or an
unavailable one for a node that is down).

The other way round a client sends each node it sees online a directed
presence (RFC 6121 4.6) instead of being subscribed to: the server then tells
that node when the client's session ends, which ends the client's watches and
ephemeral keys there. A subscription would do the same at twice the roster
changes, and a server that keeps rosters in files (Prosody's default) rewrites
the node's whole roster, one item per client, at each change.

A key is routed to the shard whose prefix is its longest segment-wise prefix.
A shard the client has heard of but whose node is offline makes operations
on it fail fast with :class:`~protocol.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slixmpp import JID, Presence

from kvstore.xmpp import Session
from protocol import keys
from protocol.errors import Unavailable
from protocol.stanza import NS as _NS

log = logging.getLogger(__name__)

_ROSTER_NS = "jabber:iq:roster"

HARD_VALUE_LIMIT = 180_000
"""Largest value any client sends: base64 makes it 240 KB, under servers' 256 KiB cap."""


@dataclass
class NodeInfo:
    """One storage node as its presence describes it."""

    bare: str
    jid: str | None = None
    """The full JID the node is online as, or None while it is offline."""
    shards: dict[str, int] = field(default_factory=dict)
    """Shard prefix -> the shard's revision when the node announced it."""
    max_value: int = HARD_VALUE_LIMIT
    reported: bool = False
    """True once the server has told us anything about this node."""
    pending: bool = False
    """Our subscription request awaits the node's approval; until then the
    server reports the node as unavailable whether it is up or not."""

    @property
    def online(self) -> bool:
        return self.jid is not None


Listener = Callable[[NodeInfo], None]


class Directory:
    """Storage nodes and the shards they serve, as presence reports them."""

    def __init__(self, session: Session, nodes: list[str], *, announce: bool = True) -> None:
        self.session = session
        self.announce = announce
        """Send our own initial presence, and a directed one to each node seen
        online; a storage node sends its own presence, with its shards."""
        own = session.jid.bare
        self.nodes: dict[str, NodeInfo] = {JID(n).bare: NodeInfo(JID(n).bare) for n in nodes
                                           if JID(n).bare != own}
        self.known_shards: set[str] = set()
        """Shard prefixes heard of: from presence, and from nodes' not-owner answers."""
        self.listeners: list[Listener] = []
        self.first_contact_wait = session.settings.timeout
        self._followed_at: float | None = None
        self._changed = asyncio.Event()
        xmpp = session.xmpp
        xmpp.add_event_handler("presence_available", self._on_available)
        xmpp.add_event_handler("presence_unavailable", self._on_unavailable)
        xmpp.add_event_handler("presence_subscribed", self._on_subscribed)
        session.on_start.append(self._follow_nodes)
        session.on_stop.append(self._forget_presence)

    # --- presence ---------------------------------------------------------

    async def _follow_nodes(self) -> None:
        self._followed_at = asyncio.get_running_loop().time()
        xmpp = self.session.xmpp
        answer = None
        try:
            answer = await xmpp.get_roster(timeout=self.session.settings.timeout)
        except Exception as exc:
            log.warning("roster fetch failed: %s", exc)
        for bare in self.nodes:
            if not _subscribed(xmpp, answer, bare):
                self.nodes[bare].pending = True
                xmpp.send_presence(pto=bare, ptype="subscribe")
        # The initial presence makes the server probe every subscribed node
        # and tell us each one's presence, online or not.
        if self.announce:
            xmpp.send_presence()

    def add_local(self, jid: str, shards: dict[str, int], max_value: int) -> None:
        """A storage node's own shards, served without asking presence."""
        node = NodeInfo(JID(jid).bare, jid, dict(shards), max_value, reported=True)
        self.nodes[node.bare] = node
        self.known_shards.update(shards)

    def _on_subscribed(self, presence: Presence) -> None:
        node = self.nodes.get(presence["from"].bare)
        if node is not None:
            node.pending = False

    def _on_available(self, presence: Presence) -> None:
        node = self.nodes.get(presence["from"].bare)
        if node is None:
            return
        payload = presence.xml.find(f"{{{_NS}}}shards")
        if payload is None:
            return  # an available resource that is not a storage node
        node.jid = str(presence["from"])
        node.reported = True
        node.shards = {}
        for shard in payload:
            prefix = shard.get("prefix")
            if prefix and keys.is_valid(prefix, allow_root=True):
                try:
                    node.shards[prefix] = int(shard.get("rev", "0"))
                except ValueError:
                    node.shards[prefix] = 0
        try:
            node.max_value = min(int(payload.get("max-value", HARD_VALUE_LIMIT)),
                                 HARD_VALUE_LIMIT)
        except ValueError:
            node.max_value = HARD_VALUE_LIMIT
        self.known_shards.update(node.shards)
        if self.announce:
            self.session.xmpp.send_presence(pto=node.jid)
        self._notify(node)

    def _on_unavailable(self, presence: Presence) -> None:
        node = self.nodes.get(presence["from"].bare)
        if node is None or node.pending:
            return
        node.reported = True
        if node.jid is not None and str(presence["from"]) != node.jid and \
                presence["from"].resource:
            return  # another resource of the same account went away
        node.jid = None
        self._notify(node)

    def _forget_presence(self) -> None:
        for node in self.nodes.values():
            if node.bare == self.session.jid.bare:
                continue
            node.reported = False
            node.pending = False
            if node.jid is not None:
                node.jid = None
                self._notify(node)

    def _notify(self, node: NodeInfo) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in list(self.listeners):
            try:
                listener(node)
            except Exception:
                log.exception("directory listener failed")

    @property
    def complete(self) -> bool:
        """Has the server told us about every configured node?

        A node whose approval of our first subscription is still awaited
        counts once we have waited ``first_contact_wait`` for it: it is
        probably offline, and waiting longer on every request helps nobody.
        """
        if all(node.reported for node in self.nodes.values()):
            return True
        if self._followed_at is None:
            return False
        waited = asyncio.get_running_loop().time() - self._followed_at
        return waited >= self.first_contact_wait and all(
            node.reported or node.pending for node in self.nodes.values())

    async def ready(self, timeout: float) -> None:
        """Wait until every configured node has been reported (up to ``timeout``).

        With an established subscription the server reports each node at
        login, online or not. On a client's very first contact the node must
        approve the subscription first, which takes a moment longer.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.complete:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                # Wake up now and then: `complete` also changes with time alone.
                async with asyncio.timeout(min(remaining, 0.25)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    # --- routing --------------------------------------------------------

    def learn_shard(self, prefix: str | None) -> None:
        if prefix and keys.is_valid(prefix, allow_root=True):
            self.known_shards.add(prefix)

    def owner(self, shard: str) -> NodeInfo | None:
        """An online node serving ``shard``, if any."""
        for node in self.nodes.values():
            if node.online and shard in node.shards:
                return node
        return None

    def shard_of(self, key: str) -> str:
        shard = keys.longest_prefix(key, self.known_shards)
        if shard is None:
            raise Unavailable(self._nobody(f"no storage node online serves {key}"))
        return shard

    def route(self, key: str) -> tuple[str, NodeInfo]:
        """The shard that owns ``key`` and an online node serving it."""
        shard = self.shard_of(key)
        node = self.owner(shard)
        if node is None:
            raise Unavailable(f"no storage node serving shard {shard} is online")
        return shard, node

    def subtree(self, key: str) -> list[str]:
        """Every shard that may hold keys of ``key``'s subtree."""
        shards = [s for s in self.known_shards if keys.is_strict_prefix(key, s)]
        top = keys.longest_prefix(key, self.known_shards)
        if top is not None:
            shards.append(top)
        return sorted(set(shards), key=keys.tree_order)

    def route_subtree(self, key: str) -> list[tuple[str, NodeInfo]]:
        shards = self.subtree(key)
        if not shards:
            raise Unavailable(self._nobody(f"no storage node online serves {key}"))
        routes = []
        for shard in shards:
            node = self.owner(shard)
            if node is None:
                raise Unavailable(f"no storage node serving shard {shard} is online")
            routes.append((shard, node))
        return routes

    def _nobody(self, message: str) -> str:
        if not self.nodes:
            return f"{message}: the config names no storage nodes (store.nodes)"
        if not any(node.online for node in self.nodes.values()):
            return f"{message}: none of {', '.join(sorted(self.nodes))} is online"
        return message


def _subscribed(xmpp: Any, answer: Any, bare: str) -> bool:
    """Whether the server's roster has us subscribed to ``bare``'s presence.

    A roster in the answer is the whole roster: a node missing from it is not
    subscribed, even if slixmpp's copy (kept across reconnects, and only ever
    updated item by item) still says so, as after a server that lost its
    rosters. An answer without a roster means "unchanged since the version
    you have" (roster versioning): slixmpp's copy holds.
    """
    if answer is not None and answer.xml.find(f"{{{_ROSTER_NS}}}query") is not None:
        item = answer["roster"]["items"].get(JID(bare))
        return item is not None and item["subscription"] in ("to", "both")
    roster = xmpp.client_roster
    return bare in roster and bool(roster[bare]["to"])
