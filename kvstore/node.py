"""The storage node service: serves its shards over XMPP.

A node is an ordinary XMPP client. It announces the shards it serves in its
presence, accepts presence subscriptions from clients (so each client learns
at once when the node comes or goes), follows the directed presence each
client sends it (so it learns when the client goes), and answers the kvstore
IQs:

* reads (get, list, status) straight from an LMDB snapshot on the event loop;
* writes (put, delete) through the :class:`~kvstore.commit.Committer`, which
  acknowledges them once they are durable;
* watches through the :class:`~kvstore.watch.WatchHub`, which replays the
  change log and follows new commits.

Bad input is answered with an error and changes nothing; an exception in a
handler becomes an internal-server-error answer, never a dead node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from slixmpp import JID, Presence
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from kvstore import acl
from kvstore.acl import Policy
from kvstore.client import Client
from kvstore.commit import Committer
from kvstore.config import NodeConfig
from kvstore.liveness import Holders
from kvstore.recipe import TreeCache
from kvstore.storage import (
    Change,
    CompactOp,
    DeleteEphemeralOp,
    DeleteOp,
    Engine,
    LeaseOp,
    PutOp,
    Retention,
    TxnOp,
    lease_owner,
)
from kvstore.watch_hub import WatchHub, WatchLimits
from kvstore.xmpp import IQ_TAG, Inbound, Session
from protocol import keys
from protocol import stanza as wire
from protocol.errors import (
    BadRequest,
    Forbidden,
    KeyNotFound,
    KvError,
    LeaseNotFound,
    NotOwner,
    ResourceLimit,
    ValueTooLarge,
)
from protocol.model import Delete, KeyValue, Put

log = logging.getLogger(__name__)

_NS_PREFIX = f"{{{wire.NS}}}"
_EVENTS_TAG = f"{{{wire.NS}}}events"
MAX_QUEUED_WRITES = 50_000
MAX_LEASE_TTL = 86_400


class _RequestMatcher(MatcherBase):
    """IQ get/set whose payload is in the kvstore namespace."""

    def __init__(self) -> None:
        super().__init__(None)

    def match(self, stanza: Any) -> bool:
        xml = stanza.xml
        if xml.tag != IQ_TAG or xml.get("type") not in ("get", "set"):
            return False
        for child in xml:
            # <events/> are pushes to the node's own watches (as a client).
            return child.tag.startswith(_NS_PREFIX) and child.tag != _EVENTS_TAG
        return False


@dataclass(eq=False)
class LeaseState:
    id: str
    ttl: float
    grantor: str
    deadline: float
    """time.monotonic() past which the lease expires unless kept alive."""


class StorageNode:
    """One storage node: an LMDB engine served through one XMPP session."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.limits = config.limits
        self.key_limits = config.limits.key_limits
        self.own_shards = list(config.shards)
        self.cluster_shards = sorted(set(config.cluster_shards) | set(config.shards))
        self.engine = Engine(
            config.data_dir,
            self.own_shards,
            map_size=config.map_size,
            retention=Retention(config.retain_revisions, config.retain_seconds),
        )
        self.session = Session(config.connection, resource="kvstore", plugins=("xep_0030",))
        self.xmpp = self.session.xmpp
        self.hub = WatchHub(self.engine, self.session,
                            max_stanza_bytes=self.limits.max_stanza_bytes,
                            limits=WatchLimits(max_watches_per_watcher=config.max_watches))
        self.policy = Policy(config.acl, peers=[*config.connection.nodes, self.jid.bare])
        # The node is also a client of the cluster: it follows the ACL rules,
        # wherever the shard holding them lives (possibly here).
        self.store = Client(config.connection, session=self.session)
        self.store.directory.add_local(str(self.jid), {s: 0 for s in self.own_shards},
                                       self.limits.max_value_bytes)
        self._in_flight: dict[str, int] = {}
        # The answers to one commit's writes leave in one write to the socket.
        self.committer = Committer(self.engine, on_commit=self._on_commit,
                                   on_settled=self.session.send_together)
        self.started = time.time()
        self.holders = Holders(
            self.engine.ephemeral_owners(), delete_keys=self._delete_ephemeral,
            send_ping=self._send_ping, server=self.jid.domain, online=self.session.online.is_set,
            grace=config.ephemeral_grace, ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout)
        now = time.monotonic()
        self.leases: dict[str, LeaseState] = {
            lease_id: LeaseState(lease_id, ttl, grantor, now + ttl)
            for lease_id, (ttl, grantor) in self.engine.leases().items()
        }
        """Leases granted here; after a restart each gets its full time again."""
        self._handlers = {
            ("get", "get"): self._on_get,
            ("get", "list"): self._on_list,
            ("get", "status"): self._on_status,
            ("set", "put"): self._on_put,
            ("set", "delete"): self._on_delete,
            ("set", "watch"): self._on_watch,
            ("set", "cancel"): self._on_cancel,
            ("set", "txn"): self._on_txn,
            ("set", "lease"): self._on_lease,
        }
        for _type, name in self._handlers:
            self.session.route(f"{_NS_PREFIX}{name}", self._on_request)
        # Anything else in the kvstore namespace (an unknown element) comes the
        # slow way, through slixmpp, and is refused as a bad request.
        self.xmpp.register_handler(Callback(
            "kv unknown requests", _RequestMatcher(),
            lambda iq: self._on_request(Inbound(iq.xml, iq.xml[0]))))
        self.xmpp.add_event_handler("presence_subscribe", self._on_subscribe)
        self.xmpp.add_event_handler("presence_available", self._on_available)
        self.xmpp.add_event_handler("presence_unavailable", self._on_unavailable)
        self.session.on_start.append(self._announce)
        self._tasks: list[asyncio.Task[None]] = []
        self._acl_view: TreeCache | None = None
        self._stopped = asyncio.Event()

    @property
    def jid(self) -> JID:
        return self.session.jid

    # --- life cycle -------------------------------------------------------

    async def start(self) -> None:
        self.xmpp["xep_0030"].add_feature(wire.NS)
        await self.session.start()
        self._tasks.append(asyncio.ensure_future(self._compact_loop()))
        self._tasks.append(asyncio.ensure_future(self.holders.run()))
        self._tasks.append(asyncio.ensure_future(self._lease_loop()))
        self._tasks.append(asyncio.ensure_future(self._follow_acl()))
        self.hub.start()
        log.info("serving %s as %s", ", ".join(self.own_shards), self.jid)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._acl_view is not None:
            await self._acl_view.close()
        await self.store.watches.close()
        self.hub.close()
        try:
            await self.committer.drain()
        except TimeoutError:
            log.warning("stopping with writes still queued")
        await self.session.close()
        self.committer.close()
        self.engine.close()
        self._stopped.set()

    async def _announce(self) -> None:
        """Fetch the roster and broadcast presence carrying the shards served."""
        try:
            await self.xmpp.get_roster(timeout=self.config.connection.timeout)
        except Exception as exc:  # the roster is a convenience; presence still goes out
            log.warning("roster fetch failed: %s", exc)
        presence = self.xmpp.Presence()
        shards = presence["kv_shards"]
        shards.xml.set("max-value", str(self.limits.max_value_bytes))
        for prefix in self.own_shards:
            # The revision at announcement: a watcher that learns of this shard
            # from this presence starts right after it and misses nothing.
            shards.add_shard(prefix, rev=self.engine.revision(prefix))
        presence.send()

    def _on_subscribe(self, presence: Presence) -> None:
        # No subscription back: each client sends the node a directed
        # presence, which the server ends with an unavailable one when the
        # client's session goes (see kvstore.directory).
        self.xmpp.send_presence(pto=presence["from"].bare, ptype="subscribed")

    def _on_available(self, presence: Presence) -> None:
        self.holders.available(str(presence["from"]))

    def _on_unavailable(self, presence: Presence) -> None:
        who = str(presence["from"])
        self.hub.drop_watcher(who)
        self.holders.unavailable(who)

    def _on_commit(self, changes: list[Change]) -> None:
        self.hub.publish(changes)

    async def _compact_loop(self) -> None:
        interval = self.config.compact_interval
        while True:
            await asyncio.sleep(interval)
            for shard in self.own_shards:
                try:
                    target = self.engine.compaction_target(shard)
                    if target:
                        await self.committer.submit(CompactOp(shard, target))
                except Exception:
                    log.exception("compaction of %s failed", shard)

    # --- dispatch -------------------------------------------------------

    def _on_request(self, request: Inbound) -> None:
        payload = request.payload
        name = payload.tag[len(_NS_PREFIX):]
        handler = self._handlers.get((request.type, name))
        try:
            sender = request.sender
            self.holders.heard(sender)
            if not self.policy.known(sender):
                log.warning("refused <%s/> from %s: not a JID this node's policy knows",
                            name, sender)
                raise Forbidden(f"{acl.bare(sender)} is not allowed to use this store")
            if handler is None:
                raise BadRequest(f"unknown kvstore request <{name}/> in an IQ {request.type}")
            handler(request, payload)
        except KvError as error:
            self.session.reply_error(request, error)
        except Exception as exc:
            log.exception("request %s failed", name)
            self.session.reply_error(request, KvError(f"internal error: {type(exc).__name__}"))

    # --- access ---------------------------------------------------------

    def _require(self, request: Inbound, perm: str, key: str, *, subtree: bool = False) -> None:
        sender = request.sender
        check = self.policy.allows_subtree if subtree else self.policy.allows
        if not check(sender, perm, key):
            log.info("refused %s on %s%s to %s", perm, key, " (subtree)" if subtree else "",
                     sender)
            raise Forbidden(f"{acl.bare(sender)} may not {perm} {key}"
                            + (" and everything below it" if subtree else ""))

    def _admit(self, request: Inbound) -> str:
        """Count a queued write against its sender's limit."""
        sender = request.sender
        queued = self._in_flight.get(sender, 0)
        if queued >= self.config.max_in_flight:
            raise ResourceLimit(f"{sender} already has {queued} writes queued")
        if self.committer.queued >= MAX_QUEUED_WRITES:
            raise ResourceLimit("the node is saturated; try again shortly")
        self._in_flight[sender] = queued + 1
        return sender

    def _release(self, sender: str) -> None:
        queued = self._in_flight.get(sender, 1) - 1
        if queued:
            self._in_flight[sender] = queued
        else:
            self._in_flight.pop(sender, None)

    async def _follow_acl(self) -> None:
        """Keep the policy in step with the rules held in the store."""
        if not self.policy.enabled:
            log.warning("no [acl] in the config: every authenticated JID may read and write")
            return
        delay = 0.2
        while True:
            view = TreeCache(self.store, acl.ACL_ROOT)
            view.add_listener(lambda _event, v=view: self.policy.update(v.data.values()))
            try:
                await view.start()
            except KvError as error:
                log.info("cannot read the access rules yet (%s); retrying", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.policy.update(view.data.values())
            self._acl_view = view
            log.info("following the access rules in %s (%d entries)", acl.ACL_ROOT,
                     len(view.data))
            return

    # --- shards ---------------------------------------------------------

    def _owner(self, key: str, hint: str | None) -> str:
        """The shard holding ``key``, which must be one of ours."""
        owner = keys.longest_prefix(key, self.cluster_shards)
        if owner is None or owner not in self.own_shards or (hint and hint != owner):
            raise NotOwner(f"{key} belongs to shard {owner or '(none)'}, not served by "
                           f"{self.jid.bare}", shard=owner)
        return owner

    def _subtree_shard(self, key: str, hint: str | None) -> str:
        """The shard to read or delete the subtree of ``key`` from.

        Without a hint that is the shard owning ``key``; a client gathering a
        subtree that spans shards names each shard below ``key`` in turn.
        """
        if not hint:
            return self._owner(key, None)
        owner = keys.longest_prefix(key, self.cluster_shards)
        if hint not in self.own_shards or not (hint == owner or keys.is_strict_prefix(key, hint)):
            raise NotOwner(f"shard {hint} is not served by {self.jid.bare} or is outside {key}",
                           shard=owner)
        return hint

    def _key(self, element: ET.Element, *, allow_root: bool = False) -> str:
        key = element.get("key")
        if key is None:
            raise BadRequest("the request has no key attribute")
        return keys.validate(key, self.key_limits, allow_root=allow_root)

    def _page_limit(self, element: ET.Element, most: int | None = None) -> int:
        most = most or self.limits.max_page
        limit = wire.parse_int(element.get("limit"), "limit", default=most, minimum=1)
        return min(limit or most, most)

    # --- reads ----------------------------------------------------------

    def _on_get(self, request: Inbound, element: ET.Element) -> None:
        prefix = wire.parse_bool(element.get("prefix"), "prefix")
        key = self._key(element, allow_root=prefix)
        hint = element.get("shard")
        if not prefix:
            shard = self._owner(key, hint)
            self._require(request, acl.READ, key)
            record, rev = self.engine.get(shard, key)
            if record is None:
                raise KeyNotFound(f"{key} not found", key=key)
            # The item alone, carrying the revision: one element less for the
            # server to parse and rebuild on the store's most frequent answer.
            self.session.reply(request, wire.item_text(record, rev))
            return
        result = wire.Get()
        if prefix:
            shard = self._subtree_shard(key, hint)
            after = element.get("after")
            if after is not None:
                keys.validate(after, self.key_limits)
            keys_only = wire.parse_bool(element.get("keys-only"), "keys-only")
            records, more, rev = self.engine.range(
                shard, key, limit=self._page_limit(element), after=after,
                max_bytes=self.limits.max_stanza_bytes, with_values=not keys_only,
            )
            visible = self.policy.reader(request.sender)
            result.set_attrs(rev=rev, more=more)
            result.set_items([r for r in records if visible(r.key)], with_value=not keys_only)
        self.session.reply(request, result.xml)

    def _on_list(self, request: Inbound, element: ET.Element) -> None:
        key = self._key(element, allow_root=True)
        shard = self._subtree_shard(key, element.get("shard"))
        after = element.get("after")
        if after is not None and (not after or "/" in after):
            raise BadRequest(f"'after' must be a child name, not {after!r}")
        names, more, rev = self.engine.children(
            shard, key, limit=self._page_limit(element, self.limits.max_list_page),
            after=after, max_bytes=self.limits.max_stanza_bytes)
        visible = self.policy.reader(request.sender)
        result = wire.ListChildren()
        result.set_attrs(rev=rev, more=more)
        result.add_children(name for name in names if visible(keys.join(key, name)))
        self.session.reply(request, result.xml)

    def _on_status(self, request: Inbound, element: ET.Element) -> None:
        result = wire.Status()
        result.set_attrs(jid=str(self.jid))
        result.xml.set("uptime", f"{time.time() - self.started:.1f}")
        result.xml.set("watchers", str(self.hub.watch_count))
        result.xml.set("commits", str(self.committer.commits))
        result.xml.set("writes", str(self.committer.ops))
        result.xml.set("commit-seconds", f"{self.committer.commit_seconds:.3f}")
        for shard in self.own_shards:
            result.add_shard(shard, **self.engine.stats(shard))
        self.session.reply(request, result.xml)

    # --- writes -----------------------------------------------------------

    def _value(self, element: ET.Element) -> bytes:
        text = element.text or ""
        limit = self.limits.max_value_bytes
        if len(text) > math.ceil(limit / 3) * 4 + 4:
            raise ValueTooLarge(f"the value exceeds the limit of {limit} bytes",
                                limit=limit)
        value = wire.decode_value(text.strip())
        if len(value) > limit:
            raise ValueTooLarge(f"the value is {len(value)} bytes, over the limit of {limit}",
                                limit=limit)
        return value

    def _compares(self, element: ET.Element) -> tuple[int | None, int | None]:
        return (wire.parse_int(element.get("if-version"), "if-version"),
                wire.parse_int(element.get("if-mod-rev"), "if-mod-rev"))

    def _on_put(self, request: Inbound, element: ET.Element) -> None:
        key = self._key(element)
        shard = self._owner(key, element.get("shard"))
        value = self._value(element)
        if_version, if_mod_rev = self._compares(element)
        ephemeral = request.sender if wire.parse_bool(element.get("ephemeral"),
                                                       "ephemeral") else None
        lease_id = element.get("lease")
        if lease_id is not None:
            if ephemeral:
                raise BadRequest("a key is bound to a session or to a lease, not both")
            ephemeral = lease_owner(self._lease(request, lease_id).id)
        self._require(request, acl.WRITE, key)
        sender = self._admit(request)
        op = PutOp(shard, key, value, if_version, if_mod_rev, ephemeral)
        self.committer.submit(op).add_done_callback(
            lambda done: self._put_done(request, sender, done))

    def _put_done(self, request: Inbound, sender: str, done: asyncio.Future[Any]) -> None:
        self._release(sender)
        outcome = self._outcome(request, done)
        if outcome is None:
            return
        kv = outcome.kv
        if kv.ephemeral:
            self.holders.add(kv.ephemeral)
        self.session.reply(request, f"<put xmlns='{wire.NS}' rev='{outcome.rev}' "
                                    f"version='{kv.version}' create-rev='{kv.create_rev}'/>")

    def _on_delete(self, request: Inbound, element: ET.Element) -> None:
        prefix = wire.parse_bool(element.get("prefix"), "prefix")
        key = self._key(element, allow_root=prefix)
        hint = element.get("shard")
        shard = self._subtree_shard(key, hint) if prefix else self._owner(key, hint)
        if_version, if_mod_rev = self._compares(element)
        if prefix and (if_version is not None or if_mod_rev is not None):
            raise BadRequest("a prefix delete takes no compare")
        self._require(request, acl.WRITE, key, subtree=prefix)
        sender = self._admit(request)
        op = DeleteOp(shard, key, prefix, if_version, if_mod_rev)
        self.committer.submit(op).add_done_callback(
            lambda done: self._delete_done(request, sender, done))

    def _delete_done(self, request: Inbound, sender: str, done: asyncio.Future[Any]) -> None:
        self._release(sender)
        outcome = self._outcome(request, done)
        if outcome is None:
            return
        result = wire.Delete()
        result.set_attrs(rev=outcome.rev, deleted=outcome.deleted)
        self.session.reply(request, result.xml)

    def _outcome(self, request: Inbound, done: asyncio.Future[Any]) -> Any:
        """The op's outcome, or None once its error has been answered."""
        error = done.exception()
        if error is None:
            error = done.result().error
        if error is None:
            return done.result()
        if not isinstance(error, KvError):
            error = KvError(f"internal error: {type(error).__name__}")
        self.session.reply_error(request, error)
        return None

    def _on_txn(self, request: Inbound, element: ET.Element) -> None:
        compares, success, failure = wire.Txn(xml=element).request()
        steps = [*success, *failure]
        if len(steps) + len(compares) > self.limits.max_txn_ops:
            raise BadRequest(f"a transaction may hold {self.limits.max_txn_ops} steps and "
                             f"compares, not {len(steps) + len(compares)}")
        for key in [c.key for c in compares] + [s.key for s in steps]:
            keys.validate(key, self.key_limits, allow_root=True)
        first = (steps or compares or [None])[0]
        if first is None:
            raise BadRequest("an empty transaction")
        shard = self._owner(first.key, element.get("shard"))
        for key in [c.key for c in compares] + [s.key for s in steps]:
            if keys.longest_prefix(key, self.cluster_shards) != shard:
                raise BadRequest(f"a transaction stays within one shard: {key} is not in "
                                 f"shard {shard}")
        for step in steps:
            if isinstance(step, Put):
                keys.validate(step.key, self.key_limits)  # the root holds no value
                if len(step.value) > self.limits.max_value_bytes:
                    raise ValueTooLarge(f"the value of {step.key} is {len(step.value)} bytes, "
                                        f"over the limit of {self.limits.max_value_bytes}",
                                        limit=self.limits.max_value_bytes)
                self._require(request, acl.WRITE, step.key)
            elif isinstance(step, Delete):
                self._require(request, acl.WRITE, step.key, subtree=step.prefix)
            else:
                self._require(request, acl.READ, step.key)
        for compare in compares:
            self._require(request, acl.READ, compare.key)
        sender = self._admit(request)
        op = TxnOp(shard, compares, success, failure, owner=request.sender,
                   read_limit=self.limits.max_page)
        self.committer.submit(op).add_done_callback(
            lambda done: self._txn_done(request, sender, shard, done))

    def _txn_done(self, request: Inbound, sender: str, shard: str,
                  done: asyncio.Future[Any]) -> None:
        self._release(sender)
        outcome = self._outcome(request, done)
        if outcome is None:
            return
        for result in outcome.results or []:
            if isinstance(result, KeyValue) and result.ephemeral:
                self.holders.add(result.ephemeral)
        visible = self.policy.reader(request.sender)
        results = [[kv for kv in r if visible(kv.key)] if isinstance(r, list) else r
                   for r in outcome.results or []]
        result = wire.Txn()
        rev = outcome.rev or self.engine.revision(shard)
        result.set_attrs(rev=rev)
        result.xml.set("succeeded", "true" if outcome.succeeded else "false")
        result.add_results(results, rev=rev)
        self.session.reply(request, result.xml)

    # --- watches --------------------------------------------------------

    def _on_watch(self, request: Inbound, element: ET.Element) -> None:
        prefix = wire.parse_bool(element.get("prefix"), "prefix")
        key = self._key(element, allow_root=prefix)
        hint = element.get("shard")
        shard = self._subtree_shard(key, hint) if prefix else self._owner(key, hint)
        start = wire.parse_int(element.get("start-rev"), "start-rev")
        watch_id = element.get("id")
        if not watch_id or len(watch_id) > 100:
            raise BadRequest("a watch needs an id of 1 to 100 characters")
        self._require(request, acl.WATCH, key)
        watch = self.hub.create(
            visible=self.policy.reader(request.sender),
            watch_id=watch_id,
            watcher=request.sender,
            shard=shard,
            key=key,
            prefix=prefix,
            start_rev=start,
            prev_kv=wire.parse_bool(element.get("prev-kv"), "prev-kv"),
            progress=wire.parse_bool(element.get("progress"), "progress"),
        )
        result = wire.Watch()
        result.set_attrs(id=watch.id, shard=shard, start_rev=watch.next_rev)
        self.session.reply(request, result.xml)

    def _on_cancel(self, request: Inbound, element: ET.Element) -> None:
        watch_id = element.get("id")
        if not watch_id:
            raise BadRequest("cancel needs the watch id")
        found = self.hub.cancel(request.sender, watch_id)
        result = wire.Cancel()
        result.set_attrs(id=watch_id, found=found)
        self.session.reply(request, result.xml)

    # --- leases -----------------------------------------------------------

    def _lease(self, request: Inbound, lease_id: str) -> LeaseState:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r} here (expired or revoked?)")
        if acl.bare(lease.grantor) != acl.bare(request.sender):
            raise Forbidden(f"lease {lease_id} belongs to {acl.bare(lease.grantor)}")
        return lease

    def _on_lease(self, request: Inbound, element: ET.Element) -> None:
        action = element.get("action")
        result = wire.Lease()
        if action == "grant":
            ttl = wire.parse_int(element.get("ttl"), "ttl", minimum=1)
            if ttl is None or ttl > MAX_LEASE_TTL:
                raise BadRequest(f"a lease needs a ttl of 1 to {MAX_LEASE_TTL} seconds")
            lease = LeaseState(secrets.token_hex(8), float(ttl), request.sender,
                               time.monotonic() + ttl)

            def granted(done: asyncio.Future[Any]) -> None:
                if self._outcome(request, done) is None:
                    return
                self.leases[lease.id] = lease
                result.set_attrs(action="grant", id=lease.id, ttl=ttl)
                self.session.reply(request, result.xml)

            op = LeaseOp(lease.id, grant=True, ttl=lease.ttl, grantor=request.sender)
            self.committer.submit(op).add_done_callback(granted)
            return
        lease = self._lease(request, element.get("id") or "")
        if action == "keepalive":
            lease.deadline = time.monotonic() + lease.ttl
            result.set_attrs(action="keepalive", id=lease.id, ttl=int(lease.ttl))
            self.session.reply(request, result.xml)
        elif action == "revoke":
            future = self._revoke(lease.id)

            def revoked(done: asyncio.Future[Any]) -> None:
                outcome = self._outcome(request, done)
                if outcome is not None:
                    result.set_attrs(action="revoke", id=lease.id, deleted=outcome.deleted)
                    self.session.reply(request, result.xml)

            future.add_done_callback(revoked)
        else:
            raise BadRequest(f"a lease action is grant, keepalive or revoke, not {action!r}")

    def _revoke(self, lease_id: str) -> asyncio.Future[Any]:
        self.leases.pop(lease_id, None)
        return self.committer.submit(LeaseOp(lease_id, grant=False))

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for lease in [lease for lease in self.leases.values() if lease.deadline < now]:
                log.info("lease %s of %s expired", lease.id, lease.grantor)
                self._revoke(lease.id).add_done_callback(_log_failure)

    # --- ephemeral keys ---------------------------------------------------
    #
    # Who holds them and when their keys go (a grace period after the
    # session's unavailable presence; two silent ping rounds for a hung one)
    # is kvstore.liveness.Holders; the node deletes the keys and sends the pings.

    async def _delete_ephemeral(self, owner: str) -> int:
        outcome = await self.committer.submit(DeleteEphemeralOp(owner))
        return outcome.deleted

    def _send_ping(self, to: str, timeout: float) -> asyncio.Future[Any]:
        return self.session.send_iq(self.session.iq(to, "get", "<ping xmlns='urn:xmpp:ping'/>"),
                                    timeout)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("revoking an expired lease failed", exc_info=task.exception())

