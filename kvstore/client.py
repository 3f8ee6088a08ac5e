"""The Python client library: ``async with Client.from_config(path) as kv``.

The client holds one XMPP session, learns from presence which storage node
serves which shard (:mod:`kvstore.directory`), sends each request to the
node that owns the key, and gathers answers from every shard a subtree
spans. Every call takes a ``timeout``; every failure is one of the typed
exceptions of :mod:`protocol.errors`. The session reconnects by itself, and
watch streams resume where they left off (:mod:`kvstore.watch_stream`).
"""

from __future__ import annotations

import asyncio
import heapq
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from slixmpp.xmlstream import ET

from kvstore.config import ConnectionSettings, load_connection
from kvstore.directory import HARD_VALUE_LIMIT, Directory, NodeInfo
from kvstore.lease import Lease
from kvstore.watch_stream import WatchRegistry, WatchStream
from kvstore.xmpp import Session, payload_of
from protocol import keys
from protocol import stanza as wire
from protocol.errors import NotOwner, Unavailable, ValueTooLarge
from protocol.model import Compare, KeyValue, Put, TxnOp

T = TypeVar("T")
E = TypeVar("E", bound=wire.KvElement)

TXN_BUDGET = 150_000
"""Bytes of values and keys put_many sends in one transaction (stanzas stay small)."""

# Syntax checks only; each node enforces its own configured limits.
CLIENT_KEY_LIMITS = keys.KeyLimits(max_bytes=511, max_depth=255)


@dataclass(frozen=True)
class PutResult:
    rev: int
    version: int
    create_rev: int
    mod_rev: int
    shard: str


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    revisions: dict[str, int] = field(default_factory=dict)
    """Shard -> the revision of the delete (shards where nothing was deleted are absent)."""


@dataclass(frozen=True)
class RangeResult:
    items: list[KeyValue]
    more: bool
    revisions: dict[str, int]
    """Shard -> the revision the shard's first page was read at.

    Watching from ``rev + 1`` of each shard follows on from this read with no
    gap (a later page may already hold some of the changes the watch then
    reports again; applying a put or delete twice is harmless).
    """

    def next_revisions(self) -> dict[str, int]:
        return {shard: rev + 1 for shard, rev in self.revisions.items()}


@dataclass(frozen=True)
class ListResult:
    names: list[str]
    more: bool
    revisions: dict[str, int]


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    """Did every compare hold (so the success steps ran)?"""
    rev: int
    """The shard revision of the transaction's writes (or read at, if it wrote nothing)."""
    results: list[Any]
    """One per step run: a PutResult, a count of deleted keys, or a list of KeyValues."""
    shard: str


@dataclass(frozen=True)
class ShardStatus:
    prefix: str
    rev: int
    compact_rev: int
    keys: int


@dataclass(frozen=True)
class NodeStatus:
    jid: str
    online: bool
    shards: list[ShardStatus]
    watchers: int = 0
    uptime: float = 0.0


def _answer(result: ET.Element, cls: type[E]) -> E:
    """The payload of an answer, wrapped in its stanza class."""
    return cls(xml=payload_of(result))


def _to_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


class Client:
    """An asyncio client of the store. Use it as an async context manager."""

    def __init__(self, settings: ConnectionSettings, *, resource: str | None = None,
                 reconnect: bool = True, session: Session | None = None) -> None:
        """A client with its own session, or riding on ``session`` (a storage node's)."""
        self.settings = settings
        self.timeout = settings.timeout
        self.shared_session = session is not None
        self.session = session or Session(settings, resource=resource, reconnect=reconnect)
        self.directory = Directory(self.session, settings.nodes, announce=session is None)
        self.watches = WatchRegistry(self)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Client:
        """A client configured from a TOML file (default: ``$KV_CONFIG``)."""
        return cls(load_connection(path), **kwargs)

    async def connect(self, timeout: float | None = None) -> Client:
        timeout = timeout or self.timeout
        if not self.shared_session:
            await self.session.start(timeout)
        await self.directory.ready(timeout)
        return self

    async def close(self) -> None:
        await self.watches.close()
        if not self.shared_session:
            await self.session.close()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def jid(self) -> str:
        return str(self.session.jid)

    # --- plumbing -------------------------------------------------------

    async def _call(self, node: NodeInfo, type_: str, payload: wire.KvElement | str,
                    timeout: float | None) -> ET.Element:
        assert node.jid is not None
        iq = self.session.iq(node.jid, type_,
                             payload if isinstance(payload, str) else payload.xml)
        return await self.session.request(iq, timeout or self.timeout)

    async def _routed(self, key: str, make: Callable[[str], wire.KvElement | str], type_: str,
                      timeout: float | None, route: tuple[str, NodeInfo] | None = None
                      ) -> tuple[ET.Element, str]:
        """Send a single-key request to the key's owner, following one not-owner hint.

        Single-key requests carry no ``shard``: the node finds the owner of the
        key itself (and refuses it if that is not one of its shards), and the
        server parses one attribute less for every request. ``route`` is the
        key's route when the caller has already looked it up.
        """
        if route is None:
            if not self.directory.complete:
                await self.directory.ready(timeout or self.timeout)
            route = self.directory.route(key)
        shard, node = route
        try:
            return await self._call(node, type_, make(shard), timeout), shard
        except NotOwner as error:
            self.directory.learn_shard(error.shard)
            retry_shard, retry_node = self.directory.route(key)
            if (retry_shard, retry_node.jid) == (shard, node.jid):
                raise Unavailable(f"{node.bare} does not serve {key}: {error}") from None
            return await self._call(retry_node, type_, make(retry_shard), timeout), retry_shard

    async def _gather(self, key: str, fetch: Callable[[str, NodeInfo], Awaitable[T]]
                      ) -> list[tuple[str, T]]:
        """Run ``fetch`` on every shard of ``key``'s subtree, concurrently."""
        if not self.directory.complete:
            await self.directory.ready(self.timeout)
        routes = self.directory.route_subtree(key)
        try:
            answers = await asyncio.gather(*(fetch(shard, node) for shard, node in routes))
        except NotOwner as error:
            self.directory.learn_shard(error.shard)
            routes = self.directory.route_subtree(key)
            answers = await asyncio.gather(*(fetch(shard, node) for shard, node in routes))
        return [(shard, answer) for (shard, _), answer in zip(routes, answers, strict=True)]

    # --- reads ----------------------------------------------------------

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue:
        """The key's value and revisions; raises KeyNotFound."""
        keys.validate(key, CLIENT_KEY_LIMITS)

        result, _ = await self._routed(key, lambda _shard: wire.get_text(key), "get", timeout)
        return wire.parse_item(payload_of(result), key)

    async def _pages(self, node: NodeInfo, limit: int | None, after: str | None,
                     ask: Callable[[str | None, int | None], wire.KvElement],
                     read: Callable[[ET.Element], tuple[list[T], str | None]],
                     timeout: float | None) -> tuple[list[T], bool, int]:
        """Follow one shard's pages until ``limit`` or the end.

        ``ask(after, remaining)`` builds a request, ``read(answer)`` returns a
        page and the cursor to resume after. Returns everything, whether a
        limit left more, and the revision of the first page.
        """
        found: list[T] = []
        first_rev: int | None = None
        cursor = after
        while True:
            remaining = None if limit is None else limit - len(found)
            answer = payload_of(await self._call(node, "get", ask(cursor, remaining), timeout))
            page, cursor = read(answer)
            found.extend(page)
            if first_rev is None:
                first_rev = wire.parse_int(answer.get("rev"), "rev", default=0)
            more = wire.parse_bool(answer.get("more"), "more")
            if not more or not page or (limit is not None and len(found) >= limit):
                return found, more, first_rev or 0

    async def get_prefix(self, key: str, *, limit: int | None = None, keys_only: bool = False,
                         after: str | None = None, timeout: float | None = None) -> RangeResult:
        """``key`` and its whole subtree, in tree order, across every shard it spans."""
        keys.validate(key, CLIENT_KEY_LIMITS, allow_root=True)
        if limit is not None and limit < 1:
            raise ValueError("limit must be positive")

        def read(answer: ET.Element) -> tuple[list[KeyValue], str | None]:
            items = wire.Get(xml=answer).items()
            return items, items[-1].key if items else None

        async def fetch(shard: str, node: NodeInfo) -> tuple[list[KeyValue], bool, int]:
            def ask(cursor: str | None, remaining: int | None) -> wire.Get:
                request = wire.Get()
                request.set_attrs(key=key, shard=shard, prefix=True, after=cursor,
                                  keys_only=keys_only, limit=remaining)
                return request

            return await self._pages(node, limit, after, ask, read, timeout)

        answers = await self._gather(key, fetch)
        merged = list(heapq.merge(*(items for _, (items, _, _) in answers),
                                  key=lambda kv: keys.tree_order(kv.key)))
        more = any(more for _, (_, more, _) in answers)
        if limit is not None and len(merged) > limit:
            merged, more = merged[:limit], True
        return RangeResult(merged, more, {shard: rev for shard, (_, _, rev) in answers})

    async def list(self, key: str, *, limit: int | None = None, after: str | None = None,
                   timeout: float | None = None) -> ListResult:
        """Names of ``key``'s direct children, sorted, gathered from every shard below it."""
        keys.validate(key, CLIENT_KEY_LIMITS, allow_root=True)

        def read(answer: ET.Element) -> tuple[list[str], str | None]:
            names = wire.ListChildren(xml=answer).children()
            return names, names[-1] if names else None

        async def fetch(shard: str, node: NodeInfo) -> tuple[list[str], bool, int]:
            def ask(cursor: str | None, remaining: int | None) -> wire.ListChildren:
                request = wire.ListChildren()
                request.set_attrs(key=key, shard=shard, after=cursor, limit=remaining)
                return request

            return await self._pages(node, limit, after, ask, read, timeout)

        answers = await self._gather(key, fetch)
        names = sorted({name for _, (page, _, _) in answers for name in page},
                       key=lambda name: name.encode())
        more = any(more for _, (_, more, _) in answers)
        if limit is not None and len(names) > limit:
            names, more = names[:limit], True
        return ListResult(names, more, {shard: rev for shard, (_, _, rev) in answers})

    # --- writes ---------------------------------------------------------

    def lease(self, ttl: int) -> Lease:
        """A lease of ``ttl`` seconds for ``put(..., lease=...)``; see :mod:`kvstore.lease`."""
        return Lease(self, ttl)

    async def put(self, key: str, value: bytes | str, *, if_version: int | None = None,
                  if_mod_rev: int | None = None, ephemeral: bool = False,
                  lease: Lease | None = None, timeout: float | None = None) -> PutResult:
        """Write ``value``; with ``if_version``/``if_mod_rev`` only if the key still matches.

        ``if_version=0`` creates the key only if it does not exist. A failed
        compare raises VersionMismatch. ``ephemeral`` binds the key to this
        session: the node deletes it when the session ends. ``lease`` binds it
        to a lease instead: the node deletes it when the lease runs out.
        """
        keys.validate(key, CLIENT_KEY_LIMITS)
        data = _to_bytes(value)
        if not self.directory.complete:
            await self.directory.ready(timeout or self.timeout)
        shard, node = self.directory.route(key)
        if len(data) > node.max_value:
            raise ValueTooLarge(
                f"the value is {len(data)} bytes, over the limit of {node.max_value}",
                limit=node.max_value)
        lease_id = await lease.id_on(node, timeout) if lease is not None else None

        request = wire.put_text(key, data, if_version=if_version, if_mod_rev=if_mod_rev,
                                ephemeral=ephemeral, lease=lease_id)
        result, shard = await self._routed(key, lambda _shard: request, "set", timeout,
                                           (shard, node))
        answer = payload_of(result)
        rev = wire.parse_int(answer.get("rev"), "rev", default=0) or 0
        return PutResult(
            rev=rev,
            version=wire.parse_int(answer.get("version"), "version", default=0) or 0,
            create_rev=wire.parse_int(answer.get("create-rev"), "create-rev", default=0) or 0,
            mod_rev=rev,
            shard=shard,
        )

    async def delete(self, key: str, *, prefix: bool = False, if_version: int | None = None,
                     if_mod_rev: int | None = None,
                     timeout: float | None = None) -> DeleteResult:
        """Delete a key (KeyNotFound if absent), or with ``prefix`` its whole subtree.

        A subtree spanning several shards is deleted shard by shard; each
        shard's part is atomic.
        """
        keys.validate(key, CLIENT_KEY_LIMITS, allow_root=prefix)
        if not prefix:
            def make(shard: str) -> wire.Delete:
                request = wire.Delete()
                request.set_attrs(key=key, if_version=if_version,
                                  if_mod_rev=if_mod_rev)
                return request

            result, shard = await self._routed(key, make, "set", timeout)
            answer = _answer(result, wire.Delete)
            return DeleteResult(answer.int_attr("deleted", 0) or 0,
                                {shard: answer.int_attr("rev", 0) or 0})

        async def fetch(shard: str, node: NodeInfo) -> tuple[int, int]:
            request = wire.Delete()
            request.set_attrs(key=key, shard=shard, prefix=True)
            answer = _answer(await self._call(node, "set", request, timeout), wire.Delete)
            return answer.int_attr("deleted", 0) or 0, answer.int_attr("rev", 0) or 0

        answers = await self._gather(key, fetch)
        return DeleteResult(sum(deleted for _, (deleted, _) in answers),
                            {shard: rev for shard, (deleted, rev) in answers if deleted})

    async def txn(self, compares: Sequence[Compare] = (), success: Sequence[TxnOp] = (),
                  failure: Sequence[TxnOp] = (), *, timeout: float | None = None) -> TxnResult:
        """An atomic transaction within one shard, as etcd's Txn.

        If every compare holds, the ``success`` steps run, else the ``failure``
        steps; all their writes share one revision and reach watchers together.
        Every key must belong to the same shard.
        """
        keys_used = [c.key for c in compares] + [s.key for s in [*success, *failure]]
        if not keys_used:
            raise ValueError("an empty transaction")
        for key in keys_used:
            keys.validate(key, CLIENT_KEY_LIMITS, allow_root=True)
        for step in [*success, *failure]:
            if isinstance(step, Put) and len(step.value) > HARD_VALUE_LIMIT:
                raise ValueTooLarge(f"the value of {step.key} is {len(step.value)} bytes",
                                    limit=HARD_VALUE_LIMIT)

        def make(shard: str) -> wire.Txn:
            request = wire.Txn()
            request.set_attrs(shard=shard)
            request.set_request(compares, success, failure)
            return request

        result, shard = await self._routed(keys_used[0], make, "set", timeout)
        answer = _answer(result, wire.Txn)
        rev = answer.int_attr("rev", 0) or 0
        parsed = []
        for item in answer.results():
            if isinstance(item, dict):
                parsed.append(PutResult(rev, item["version"], item["create-rev"],
                                        item["mod-rev"], shard))
            else:
                parsed.append(item)
        return TxnResult(answer.attr("succeeded") == "true", rev, parsed, shard)

    async def put_many(self, items: Mapping[str, bytes | str], *, ephemeral: bool = False,
                       timeout: float | None = None) -> dict[str, int]:
        """Write many keys: one transaction per shard (atomic within each shard).

        Returns shard -> the revision of its writes. A shard's keys are split
        into several transactions only when they would not fit in one stanza.
        ``ephemeral`` binds every key to this session, as :meth:`put` does.
        """
        if not self.directory.complete:
            await self.directory.ready(timeout or self.timeout)
        by_shard: dict[str, list[Put]] = {}
        for key, value in items.items():
            keys.validate(key, CLIENT_KEY_LIMITS)
            by_shard.setdefault(self.directory.shard_of(key), []).append(
                Put(key, _to_bytes(value), ephemeral))
        chunks: list[list[Put]] = []
        for puts in by_shard.values():
            chunk: list[Put] = []
            size = 0
            for put in puts:
                cost = len(put.value) * 4 // 3 + len(put.key) + 64
                if chunk and (size + cost > TXN_BUDGET or len(chunk) >= 1000):
                    chunks.append(chunk)
                    chunk, size = [], 0
                chunk.append(put)
                size += cost
            chunks.append(chunk)
        done = await asyncio.gather(*(self.txn(success=chunk, timeout=timeout)
                                      for chunk in chunks))
        revisions: dict[str, int] = {}
        for result in done:
            revisions[result.shard] = max(revisions.get(result.shard, 0), result.rev)
        return revisions

    # --- watches ----------------------------------------------------------

    def watch(self, key: str, *, prefix: bool = False,
              since: int | Mapping[str, int] | None = None, prev_kv: bool = False,
              unavailable_timeout: float | None = 30.0) -> WatchStream:
        """A stream of changes to ``key`` (or its subtree), from ``since`` on.

        ``since`` is the first revision wanted (inclusive, as etcd's
        ``--rev``); revisions are per shard, so a subtree spanning shards
        takes a mapping shard -> revision (``RangeResult.next_revisions()``).
        Without it the stream starts now. Iterate it with ``async for``;
        leaving the loop cancels it. The stream resumes by itself after a
        node restart, a server restart or a reconnect, with no gap and no
        duplicate; if the shards it follows stay unreachable for
        ``unavailable_timeout`` seconds it raises Unavailable.
        """
        keys.validate(key, CLIENT_KEY_LIMITS, allow_root=prefix)
        return WatchStream(self, key, prefix=prefix, since=since, prev_kv=prev_kv,
                           unavailable_timeout=unavailable_timeout)

    # --- status ---------------------------------------------------------

    async def status(self, *, timeout: float | None = None) -> list[NodeStatus]:
        """Every configured storage node: online or not, and its shards' revisions."""

        async def ask(node: NodeInfo) -> NodeStatus:
            if not node.online:
                return NodeStatus(node.bare, False, [
                    ShardStatus(prefix, rev, 0, 0) for prefix, rev in sorted(node.shards.items())
                ])
            try:
                answer = _answer(await self._call(node, "get", wire.Status(), timeout), wire.Status)
            except Unavailable:
                return NodeStatus(node.jid or node.bare, False, [])
            shards = [
                ShardStatus(s.get("prefix", "?"), int(s.get("rev", 0)),
                            int(s.get("compact-rev", 0)), int(s.get("keys", 0)))
                for s in answer.shards()
            ]
            return NodeStatus(node.jid or node.bare, True, shards,
                              int(answer.attr("watchers") or 0),
                              float(answer.attr("uptime") or 0.0))

        nodes = sorted(self.directory.nodes.values(), key=lambda n: n.bare)
        return list(await asyncio.gather(*(ask(node) for node in nodes)))
