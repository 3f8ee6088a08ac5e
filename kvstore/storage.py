"""The storage engine: one LMDB environment per node, revisions per shard.

Each shard owns two LMDB databases: ``kv`` (key -> current record) and ``log``
(revision -> the changes made at that revision). The log is the spine of the
store: watches replay it, and compaction trims it by count and by age. Keys are
stored in tree order (see :func:`protocol.keys.tree_order`), so a subtree is one
contiguous range and the children of a key can be listed by skipping from one
child's subtree to the next.

Writes are applied in batches, each batch one LMDB transaction and one fsync
(``apply``); the node's committer decides what goes in a batch. Reads may run
on any thread while a batch commits: LMDB gives every read transaction a
consistent snapshot, and the revision a read reports is read from that same
snapshot.

This module knows nothing of XMPP or asyncio and can be tested on its own.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from protocol import keys
from protocol.errors import (
    BadRequest,
    Compacted,
    KeyNotFound,
    KvError,
    NotOwner,
    StorageFull,
    VersionMismatch,
)
from protocol.model import Compare, Delete, Event, EventType, Get, KeyValue, Put

TxnStep = Put | Delete | Get

_REV = struct.Struct(">Q")
_PUT, _DELETE = 0, 1


@dataclass(frozen=True)
class Retention:
    """How much change history each shard keeps for watchers to resume from."""

    max_revisions: int = 100_000
    max_age_seconds: float = 24 * 3600.0
    max_per_run: int = 10_000
    """Log entries removed per compaction transaction, to keep writer pauses short."""


# --- write operations --------------------------------------------------------


@dataclass(slots=True)
class PutOp:
    shard: str
    key: str
    value: bytes
    if_version: int | None = None
    if_mod_rev: int | None = None
    ephemeral: str | None = None
    """Full JID the key is bound to; the key dies with that session."""


@dataclass(slots=True)
class DeleteOp:
    shard: str
    key: str
    prefix: bool = False
    if_version: int | None = None
    if_mod_rev: int | None = None


@dataclass(slots=True)
class CompactOp:
    shard: str
    upto_rev: int


@dataclass(slots=True)
class DeleteEphemeralOp:
    """Delete every key bound to one session (the session ended)."""

    owner: str


@dataclass(slots=True)
class LeaseOp:
    """Grant a lease (durably: it survives a restart), or revoke it with its keys."""

    lease_id: str
    grant: bool
    ttl: float = 0.0
    grantor: str = ""


_LEASE_OWNER = "lease:"


def lease_owner(lease_id: str) -> str:
    """The owner recorded on keys bound to a lease (ephemeral keys record a full JID)."""
    return f"{_LEASE_OWNER}{lease_id}"


def is_lease_owner(owner: str) -> bool:
    """Whether keys recorded with ``owner`` are bound to a lease, not to a session."""
    return owner.startswith(_LEASE_OWNER)


@dataclass(slots=True)
class TxnOp:
    """etcd's transaction within one shard: if every compare holds, run
    ``success``, else ``failure``; all the writes share one revision."""

    shard: str
    compares: list[Compare]
    success: list[TxnStep]
    failure: list[TxnStep]
    owner: str | None = None
    """Full JID of the writer, for ephemeral puts."""
    read_limit: int = 1000
    """Most records one get step returns."""


WriteOp = PutOp | DeleteOp | CompactOp | DeleteEphemeralOp | TxnOp | LeaseOp


@dataclass(slots=True)
class Change:
    """What one write did: a new revision of one shard and its events."""

    shard: str
    rev: int
    events: list[Event]


@dataclass(slots=True)
class Outcome:
    """The result of one write op: the changes it made, or the error it raised."""

    changes: list[Change] = field(default_factory=list)
    error: KvError | None = None
    deleted: int = 0
    succeeded: bool = True
    """For a transaction: did its compares hold?"""
    results: list[Any] | None = None
    """For a transaction: one result per step run (a KeyValue for a put, a
    count for a delete, a list of KeyValues for a get)."""

    @property
    def rev(self) -> int:
        return self.changes[-1].rev if self.changes else 0

    @property
    def kv(self) -> KeyValue | None:
        if self.changes and self.changes[-1].events:
            return self.changes[-1].events[-1].kv
        return None


# --- records -----------------------------------------------------------------


def _pack_record(kv: KeyValue) -> bytes:
    return msgpack.packb((kv.create_rev, kv.mod_rev, kv.version, kv.value, kv.ephemeral))


def _unpack_record(key: str, raw: bytes) -> KeyValue:
    create_rev, mod_rev, version, value, ephemeral = msgpack.unpackb(raw)
    return KeyValue(key, value, version, create_rev, mod_rev, ephemeral)


def _pack_log(events: list[Event]) -> bytes:
    """One revision's log entry.

    A previous value is logged by reference (the revision that wrote it), not
    copied: a delete then costs a few bytes of log instead of the whole value,
    and a put writes its value twice (record and log), not three times.
    """
    entries = []
    for event in events:
        kv, prev = event.kv, event.prev
        entries.append((
            _PUT if event.type is EventType.PUT else _DELETE,
            kv.key,
            kv.value,
            kv.create_rev,
            kv.version,
            kv.ephemeral,
            (prev.mod_rev, prev.create_rev, prev.version, prev.ephemeral) if prev else None,
        ))
    return msgpack.packb((time.time(), entries))


Resolver = Callable[[int, str], bytes | None]
"""(revision, key) -> the value that revision wrote to the key, if the log still has it."""


def _unpack_log(shard: str, rev: int, raw: bytes,
                resolve: Resolver | None = None) -> tuple[float, list[Event]]:
    """A revision's events; previous values are looked up through ``resolve``.

    Without a resolver, or when compaction already discarded the revision
    that wrote it, an event carries no previous record.
    """
    stamp, entries = msgpack.unpackb(raw)
    events = []
    for kind, key, value, create_rev, version, ephemeral, prev in entries:
        prev_kv = None
        if prev is not None and resolve is not None:
            prev_value = resolve(prev[0], key)
            if prev_value is not None:
                prev_kv = KeyValue(key, prev_value, prev[2], prev[1], prev[0], prev[3])
        events.append(Event(
            EventType.PUT if kind == _PUT else EventType.DELETE,
            KeyValue(key, value, version, create_rev, rev, ephemeral),
            shard,
            prev_kv,
        ))
    return stamp, events


def _item_size(raw_key: bytes, value_bytes: int) -> int:
    """Bytes a record takes in a page answer: msgpack (key, value and four small
    fields), then base64's four bytes for every three."""
    return (len(raw_key) + value_bytes + 32) * 4 // 3 + 4


def _name_size(name: bytes) -> int:
    """Bytes a child name takes in a list answer: the name XML-escaped, and a ``/``."""
    escapes = 4 * name.count(b"&") + 3 * (name.count(b"<") + name.count(b">"))
    return len(name) + escapes + 1


DISK_RESERVE = 1 << 20
"""Free bytes below which a failed write is taken for a full disk."""


def _is_disk_full(exc: BaseException, path: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(exc) or "Disk quota" in str(exc):
        return True
    # LMDB reports a short write (what a full disk causes) as EIO.
    if "Input/output error" in str(exc):
        try:
            stats = os.statvfs(path)
        except OSError:
            return False
        return stats.f_bavail * stats.f_frsize < DISK_RESERVE
    return False


def _ephemeral_entry(owner: str, shard: str, raw_key: bytes) -> bytes:
    """Index entry for an ephemeral key: owner first, so a session's keys are one range.

    The key part is hashed: LMDB keys are limited to 511 bytes, and a JID plus
    a long key could exceed it.
    """
    digest = hashlib.blake2b(shard.encode() + b"\0" + raw_key, digest_size=16).digest()
    return owner.encode() + b"\0" + digest


def _scope(shard: str, key: str) -> str | None:
    """The part of ``key``'s subtree that shard ``shard`` can hold: the deeper of the two.

    None if the two are disjoint: the shard holds nothing of that subtree.
    """
    if keys.is_prefix(shard, key):
        return key
    return shard if keys.is_prefix(key, shard) else None


def _subtree(cursor: lmdb.Cursor, top: bytes, start: bytes | None = None) -> Iterator[bytes]:
    """Tree-ordered keys of ``top`` and its subtree, from ``start`` on (exclusive)."""
    below = top + b"\0" if top else b""
    if start is None or start < top:
        found = cursor.set_range(top)
    else:
        found = cursor.set_range(start)
        if found and cursor.key() == start:
            found = cursor.next()
    while found:
        raw_key = cursor.key()
        if raw_key != top and not raw_key.startswith(below):
            return
        yield raw_key
        found = cursor.next()


# --- the engine --------------------------------------------------------------


class Engine:
    """All shards of one storage node, in one LMDB environment."""

    def __init__(self, path: str | Path, shards: Sequence[str], *,
                 map_size: int = 1 << 32, sync: bool = True,
                 retention: Retention | None = None) -> None:
        if not shards:
            raise ValueError("a storage node needs at least one shard")
        for prefix in shards:
            keys.validate(prefix, allow_root=True)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.retention = retention or Retention()
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=2 * len(shards) + 2,
            sync=sync,
            metasync=sync,
            readahead=False,
        )
        self._meta = self.env.open_db(b"meta")
        self._ephemeral = self.env.open_db(b"ephemeral")
        self._kv: dict[str, object] = {}
        self._log: dict[str, object] = {}
        self._rev_names = {prefix: b"rev:" + prefix.encode() for prefix in shards}
        for prefix in shards:
            self._kv[prefix] = self.env.open_db(b"kv:" + prefix.encode())
            self._log[prefix] = self.env.open_db(b"log:" + prefix.encode())

    @property
    def shards(self) -> list[str]:
        return list(self._kv)

    def close(self) -> None:
        self.env.close()

    # --- reads ------------------------------------------------------------

    def _kv_db(self, shard: str):
        db = self._kv.get(shard)
        if db is None:
            raise NotOwner(f"this node does not hold shard {shard}", shard=None)
        return db

    @staticmethod
    def _meta_int(txn: lmdb.Transaction, db, name: bytes) -> int:
        raw = txn.get(name, db=db)
        return _REV.unpack(raw)[0] if raw else 0

    def revision(self, shard: str, txn: lmdb.Transaction | None = None) -> int:
        name = self._rev_names.get(shard) or b"rev:" + shard.encode()
        if txn is None:
            with self.env.begin() as txn:
                return self._meta_int(txn, self._meta, name)
        return self._meta_int(txn, self._meta, name)

    def compact_revision(self, shard: str) -> int:
        with self.env.begin() as txn:
            return self._meta_int(txn, self._meta, b"compact:" + shard.encode())

    def get(self, shard: str, key: str) -> tuple[KeyValue | None, int]:
        """The key's record (or None) and the shard revision it was read at."""
        db = self._kv_db(shard)
        with self.env.begin() as txn:
            raw = txn.get(keys.tree_order(key), db=db)
            rev = self.revision(shard, txn)
        return (_unpack_record(key, raw) if raw is not None else None), rev

    def range(self, shard: str, key: str, *, limit: int, after: str | None = None,
              max_bytes: int | None = None,
              with_values: bool = True) -> tuple[list[KeyValue], bool, int]:
        """Records of ``key`` and its subtree in tree order.

        Returns (records, more, rev); ``more`` says the limit (a count, or a
        byte budget for the answer as it travels: keys XML-escaped, values in
        base64) cut the answer short.
        """
        db = self._kv_db(shard)
        scope = _scope(shard, key)
        if scope is None:
            return [], False, self.revision(shard)
        top = keys.tree_order(scope)
        start = keys.tree_order(after) if after else None
        found: list[KeyValue] = []
        budget = max_bytes
        more = False
        with self.env.begin() as txn:
            rev = self.revision(shard, txn)
            cursor = txn.cursor(db=db)
            for raw_key in _subtree(cursor, top, start):
                if len(found) >= limit:
                    more = True
                    break
                record = _unpack_record(keys.from_tree_order(raw_key), cursor.value())
                if budget is not None:
                    budget -= _item_size(raw_key, len(record.value) if with_values else 0)
                    if budget < 0 and found:
                        more = True
                        break
                found.append(record)
        return found, more, rev

    def children(self, shard: str, key: str, *, limit: int, after: str | None = None,
                 max_bytes: int | None = None) -> tuple[list[str], bool, int]:
        """Names of the direct children of ``key`` held by this shard, sorted.

        A child counts if it holds a value or has anything below it. ``limit``
        (a count) and ``max_bytes`` (the answer's size) cut the list short:
        ``more`` is then True.
        """
        db = self._kv_db(shard)
        if not (keys.is_prefix(shard, key) or keys.is_prefix(key, shard)):
            return [], False, self.revision(shard)
        below = keys.tree_order(key) + b"\0"
        names: list[str] = []
        more = False
        budget = max_bytes
        with self.env.begin() as txn:
            rev = self.revision(shard, txn)
            cursor = txn.cursor(db=db)
            target = below + after.encode() + b"\x01" if after else below
            found = cursor.set_range(target)
            while found:
                raw_key = cursor.key()
                if not raw_key.startswith(below):
                    break
                name = raw_key[len(below):].split(b"\0", 1)[0]
                if len(names) >= limit:
                    more = True
                    break
                if budget is not None:
                    budget -= _name_size(name)
                    if budget < 0 and names:
                        more = True
                        break
                names.append(name.decode("utf-8"))
                # The child's own subtree follows it; skip it in one seek.
                found = cursor.next()
                if found and cursor.key().startswith(below + name + b"\0"):
                    found = cursor.set_range(below + name + b"\x01")
        return names, more, rev

    def events(self, shard: str, start_rev: int, *, limit: int = 1000,
               max_bytes: int | None = None,
               with_prev: bool = True) -> tuple[list[Change], int]:
        """Logged changes from ``start_rev`` on, oldest first, and the current revision.

        Raises :class:`Compacted` if compaction already discarded ``start_rev``.
        """
        db = self._log.get(shard)
        if db is None:
            raise NotOwner(f"this node does not hold shard {shard}", shard=None)
        changes: list[Change] = []
        budget = max_bytes
        with self.env.begin() as txn:
            rev = self.revision(shard, txn)
            compacted = self._meta_int(txn, self._meta, b"compact:" + shard.encode())
            if start_rev <= compacted:
                raise Compacted(
                    f"shard {shard} no longer holds revision {start_rev}; the oldest held is "
                    f"{compacted + 1}", **{"compact-rev": compacted})
            resolve = self._resolver(txn, db) if with_prev else None
            cursor = txn.cursor(db=db)
            found = cursor.set_range(_REV.pack(max(start_rev, 1)))
            while found and len(changes) < limit:
                at = _REV.unpack(cursor.key())[0]
                raw = cursor.value()
                _, events = _unpack_log(shard, at, raw, resolve)
                if budget is not None:
                    budget -= len(raw) + sum(len(e.prev.value) for e in events if e.prev)
                    if budget < 0 and changes:
                        break
                changes.append(Change(shard, at, events))
                found = cursor.next()
        return changes, rev

    @staticmethod
    def _resolver(txn: lmdb.Transaction, db: Any) -> Resolver:
        def resolve(at: int, key: str) -> bytes | None:
            raw = txn.get(_REV.pack(at), db=db)
            if raw is None:
                return None
            for entry in msgpack.unpackb(raw)[1]:
                if entry[1] == key:
                    return entry[2]
            return None

        return resolve

    def stats(self, shard: str) -> dict[str, int]:
        db = self._kv_db(shard)
        with self.env.begin() as txn:
            return {
                "rev": self.revision(shard, txn),
                "compact-rev": self._meta_int(txn, self._meta, b"compact:" + shard.encode()),
                "keys": txn.stat(db)["entries"],
            }

    def leases(self) -> dict[str, tuple[float, str]]:
        """Every lease granted and not revoked: id -> (ttl, grantor)."""
        found = {}
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._meta)
            ok = cursor.set_range(b"lease:")
            while ok and cursor.key().startswith(b"lease:"):
                ttl, grantor = msgpack.unpackb(cursor.value())
                found[cursor.key()[6:].decode()] = (ttl, grantor)
                ok = cursor.next()
        return found

    def ephemeral_owners(self) -> list[str]:
        """Every session that holds ephemeral keys (for liveness checks after a restart)."""
        owners: list[str] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._ephemeral)
            found = cursor.first()
            while found:
                owner = cursor.key().split(b"\0", 1)[0]
                owners.append(owner.decode())
                found = cursor.set_range(owner + b"\x01")
        return owners

    # --- writes -----------------------------------------------------------

    def apply(self, ops: Sequence[WriteOp]) -> list[Outcome]:
        """Apply ``ops`` in order in one transaction and commit it durably.

        An op that fails (a compare, a missing key) changes nothing and
        reports its error; the others still apply. If the commit itself fails
        (map or disk full) nothing applies and :class:`StorageFull` is raised.
        """
        try:
            return self._apply(ops)
        except StorageFull as full:
            if not any(isinstance(op, PutOp) for op in ops):
                raise
            # Refuse what takes room, but still run what makes room (deletes,
            # compaction): a full store must stay able to shrink.
            others = iter(self._apply([op for op in ops if not isinstance(op, PutOp)]))
            return [Outcome(error=StorageFull(str(full))) if isinstance(op, PutOp)
                    else next(others) for op in ops]

    def _apply(self, ops: Sequence[WriteOp]) -> list[Outcome]:
        try:
            with self.env.begin(write=True) as txn:
                batch = _Batch(self, txn)
                outcomes = [batch.run(op) for op in ops]
                batch.finish()
        except lmdb.MapFullError:
            raise StorageFull("the storage map is full; raise storage.map_size") from None
        except (lmdb.Error, OSError) as exc:
            if _is_disk_full(exc, self.path):
                raise StorageFull(f"the disk is full: {exc}") from None
            raise
        return outcomes

    def compaction_target(self, shard: str, now: float | None = None) -> int:
        """The highest revision the retention policy lets go of (0: nothing to do)."""
        db = self._log[shard]
        now = time.time() if now is None else now
        with self.env.begin() as txn:
            rev = self.revision(shard, txn)
            target = max(0, rev - self.retention.max_revisions)
            cursor = txn.cursor(db=db)
            found = cursor.set_range(_REV.pack(target + 1))
            checked = 0
            while found and checked < self.retention.max_per_run:
                stamp = msgpack.unpackb(cursor.value())[0]
                if now - stamp <= self.retention.max_age_seconds:
                    break
                target = _REV.unpack(cursor.key())[0]
                checked += 1
                found = cursor.next()
            compacted = self._meta_int(txn, self._meta, b"compact:" + shard.encode())
        return target if target > compacted else 0


class _Batch:
    """The ops of one write transaction; keeps per-shard revisions as they advance."""

    def __init__(self, engine: Engine, txn: lmdb.Transaction) -> None:
        self.engine = engine
        self.txn = txn
        self.revs: dict[str, int] = {}

    def run(self, op: WriteOp) -> Outcome:
        try:
            if isinstance(op, PutOp):
                return self._put(op)
            if isinstance(op, DeleteOp):
                return self._delete(op)
            if isinstance(op, CompactOp):
                return self._compact(op)
            if isinstance(op, DeleteEphemeralOp):
                return self._delete_ephemeral(op)
            if isinstance(op, TxnOp):
                return self._txn(op)
            if isinstance(op, LeaseOp):
                return self._lease(op)
            raise BadRequest(f"unknown write op {type(op).__name__}")
        except KvError as error:
            return Outcome(error=error)

    def finish(self) -> None:
        meta = self.engine._meta
        for shard, rev in self.revs.items():
            self.txn.put(b"rev:" + shard.encode(), _REV.pack(rev), db=meta)

    def _next_rev(self, shard: str) -> int:
        rev = self.revs.get(shard)
        if rev is None:
            rev = self.engine.revision(shard, self.txn)
        self.revs[shard] = rev + 1
        return rev + 1

    def _log(self, shard: str, rev: int, events: list[Event]) -> Change:
        self.txn.put(_REV.pack(rev), _pack_log(events), db=self.engine._log[shard])
        return Change(shard, rev, events)

    def _read(self, db, raw_key: bytes, key: str) -> KeyValue | None:
        raw = self.txn.get(raw_key, db=db)
        return _unpack_record(key, raw) if raw is not None else None

    @staticmethod
    def _compare(current: KeyValue | None, if_version: int | None,
                 if_mod_rev: int | None) -> None:
        version = current.version if current else 0
        mod_rev = current.mod_rev if current else 0
        if (if_version is not None and version != if_version) or (
            if_mod_rev is not None and mod_rev != if_mod_rev
        ):
            raise VersionMismatch(
                f"compare failed: current version {version}, mod-rev {mod_rev}",
                **{"current-version": version, "current-mod-rev": mod_rev},
            )

    def _index_ephemeral(self, shard: str, raw_key: bytes, old: str | None,
                         new: str | None) -> None:
        if old == new:
            return
        db = self.engine._ephemeral
        if old:
            self.txn.delete(_ephemeral_entry(old, shard, raw_key), db=db)
        if new:
            self.txn.put(_ephemeral_entry(new, shard, raw_key),
                         msgpack.packb((shard, raw_key)), db=db)

    def _put(self, op: PutOp) -> Outcome:
        db = self.engine._kv_db(op.shard)
        raw_key = keys.tree_order(op.key)
        current = self._read(db, raw_key, op.key)
        self._compare(current, op.if_version, op.if_mod_rev)
        rev = self._next_rev(op.shard)
        kv = KeyValue(
            op.key,
            op.value,
            current.version + 1 if current else 1,
            current.create_rev if current else rev,
            rev,
            op.ephemeral,
        )
        self.txn.put(raw_key, _pack_record(kv), db=db)
        self._index_ephemeral(op.shard, raw_key, current.ephemeral if current else None,
                              op.ephemeral)
        return Outcome(changes=[self._log(op.shard, rev, [Event(EventType.PUT, kv, op.shard,
                                                                current)])])

    def _tombstone(self, shard: str, current: KeyValue, rev: int) -> Event:
        return Event(EventType.DELETE, KeyValue(current.key, b"", 0, current.create_rev, rev),
                     shard, current)

    def _delete(self, op: DeleteOp) -> Outcome:
        db = self.engine._kv_db(op.shard)
        if not op.prefix:
            raw_key = keys.tree_order(op.key)
            current = self._read(db, raw_key, op.key)
            if current is None:
                raise KeyNotFound(f"{op.key} not found", key=op.key)
            self._compare(current, op.if_version, op.if_mod_rev)
            rev = self._next_rev(op.shard)
            self.txn.delete(raw_key, db=db)
            self._index_ephemeral(op.shard, raw_key, current.ephemeral, None)
            change = self._log(op.shard, rev, [self._tombstone(op.shard, current, rev)])
            return Outcome(changes=[change], deleted=1)

        scope = _scope(op.shard, op.key)
        if scope is None:
            return Outcome()
        top = keys.tree_order(scope)
        cursor = self.txn.cursor(db=db)
        doomed = [(raw_key, cursor.value()) for raw_key in _subtree(cursor, top)]
        if not doomed:
            return Outcome()
        rev = self._next_rev(op.shard)
        events = []
        for raw_key, raw in doomed:
            current = _unpack_record(keys.from_tree_order(raw_key), raw)
            self.txn.delete(raw_key, db=db)
            self._index_ephemeral(op.shard, raw_key, current.ephemeral, None)
            events.append(self._tombstone(op.shard, current, rev))
        return Outcome(changes=[self._log(op.shard, rev, events)], deleted=len(events))

    def _delete_ephemeral(self, op: DeleteEphemeralOp) -> Outcome:
        index = self.engine._ephemeral
        head = op.owner.encode() + b"\0"
        cursor = self.txn.cursor(db=index)
        entries = []
        found = cursor.set_range(head)
        while found and cursor.key().startswith(head):
            entries.append((cursor.key(), msgpack.unpackb(cursor.value())))
            found = cursor.next()
        doomed: dict[str, list[KeyValue]] = {}
        for entry, (shard, raw_key) in entries:
            self.txn.delete(entry, db=index)
            db = self.engine._kv.get(shard)
            if db is None:
                continue
            current = self._read(db, raw_key, keys.from_tree_order(raw_key))
            if current is not None and current.ephemeral == op.owner:
                doomed.setdefault(shard, []).append(current)
        outcome = Outcome()
        for shard, records in doomed.items():
            db = self.engine._kv[shard]
            rev = self._next_rev(shard)
            records.sort(key=lambda kv: keys.tree_order(kv.key))
            for kv in records:
                self.txn.delete(keys.tree_order(kv.key), db=db)
            events = [self._tombstone(shard, kv, rev) for kv in records]
            outcome.changes.append(self._log(shard, rev, events))
            outcome.deleted += len(events)
        return outcome

    def _txn(self, op: TxnOp) -> Outcome:
        db = self.engine._kv_db(op.shard)
        for step in [*op.success, *op.failure]:
            if keys.longest_prefix(step.key, [op.shard]) is None:
                raise BadRequest(f"{step.key} is outside shard {op.shard}")
        for branch in (op.success, op.failure):
            written = [s.key for s in branch if isinstance(s, Put | Delete)]
            if len(written) != len(set(written)):
                raise BadRequest("a transaction may write each key once")
        # Everything that can refuse the transaction is checked above: from
        # here on the steps only read and write, so a failure cannot leave
        # half a transaction in the batch.
        succeeded = all(c.holds(self._read(db, keys.tree_order(c.key), c.key))
                        for c in op.compares)
        rev = 0
        events: list[Event] = []
        results: list[Any] = []
        deleted = 0

        def revision() -> int:
            nonlocal rev
            if not rev:
                rev = self._next_rev(op.shard)
            return rev

        for step in op.success if succeeded else op.failure:
            raw_key = keys.tree_order(step.key)
            if isinstance(step, Get):
                if not step.prefix:
                    current = self._read(db, raw_key, step.key)
                    results.append([current] if current else [])
                    continue
                limit = min(step.limit or op.read_limit, op.read_limit)
                cursor = self.txn.cursor(db=db)
                found = []
                for key_bytes in _subtree(cursor, keys.tree_order(_scope(op.shard, step.key)
                                                                  or step.key)):
                    if len(found) >= limit:
                        break
                    found.append(_unpack_record(keys.from_tree_order(key_bytes),
                                                cursor.value()))
                results.append(found)
            elif isinstance(step, Put):
                current = self._read(db, raw_key, step.key)
                at = revision()
                owner = op.owner if step.ephemeral else None
                kv = KeyValue(step.key, step.value, current.version + 1 if current else 1,
                              current.create_rev if current else at, at, owner)
                self.txn.put(raw_key, _pack_record(kv), db=db)
                self._index_ephemeral(op.shard, raw_key, current.ephemeral if current else None,
                                      owner)
                events.append(Event(EventType.PUT, kv, op.shard, current))
                results.append(kv)
            elif not step.prefix:
                current = self._read(db, raw_key, step.key)
                if current is not None:
                    at = revision()
                    self.txn.delete(raw_key, db=db)
                    self._index_ephemeral(op.shard, raw_key, current.ephemeral, None)
                    events.append(self._tombstone(op.shard, current, at))
                results.append(1 if current else 0)
                deleted += 1 if current else 0
            else:
                top = _scope(op.shard, step.key)
                cursor = self.txn.cursor(db=db)
                doomed = [] if top is None else [
                    (k, cursor.value()) for k in _subtree(cursor, keys.tree_order(top))]
                for key_bytes, raw in doomed:
                    current = _unpack_record(keys.from_tree_order(key_bytes), raw)
                    self.txn.delete(key_bytes, db=db)
                    self._index_ephemeral(op.shard, key_bytes, current.ephemeral, None)
                    events.append(self._tombstone(op.shard, current, revision()))
                results.append(len(doomed))
                deleted += len(doomed)
        changes = [self._log(op.shard, rev, events)] if events else []
        return Outcome(changes=changes, deleted=deleted, succeeded=succeeded, results=results)

    def _lease(self, op: LeaseOp) -> Outcome:
        name = b"lease:" + op.lease_id.encode()
        if op.grant:
            self.txn.put(name, msgpack.packb((op.ttl, op.grantor)), db=self.engine._meta)
            return Outcome()
        self.txn.delete(name, db=self.engine._meta)
        return self._delete_ephemeral(DeleteEphemeralOp(lease_owner(op.lease_id)))

    def _compact(self, op: CompactOp) -> Outcome:
        db = self.engine._log[op.shard]
        meta = self.engine._meta
        name = b"compact:" + op.shard.encode()
        compacted = self.engine._meta_int(self.txn, meta, name)
        upto = min(op.upto_rev, self.engine.revision(op.shard, self.txn))
        if upto <= compacted:
            return Outcome()
        # Stop after max_per_run entries: the next run takes the rest.
        upto = min(upto, compacted + self.engine.retention.max_per_run)
        cursor = self.txn.cursor(db=db)
        doomed = []
        found = cursor.set_range(_REV.pack(compacted + 1))
        while found and _REV.unpack(cursor.key())[0] <= upto:
            doomed.append(cursor.key())
            found = cursor.next()
        for raw_rev in doomed:
            self.txn.delete(raw_rev, db=db)
        self.txn.put(name, _REV.pack(upto), db=meta)
        return Outcome(deleted=len(doomed))
