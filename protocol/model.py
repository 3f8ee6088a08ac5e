"""The data model shared by nodes and clients: stored records and change events."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as stored: its value and etcd-style revisions.

    ``create_rev`` is the shard revision that created the key, ``mod_rev`` the
    one that last changed it, ``version`` counts changes since creation (1 on
    create; a deleted key has version 0). ``ephemeral`` holds the full JID of
    the session the key is bound to, if any.
    """

    key: str
    value: bytes
    version: int
    create_rev: int
    mod_rev: int
    ephemeral: str | None = None


class EventType(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    """One change to one key, at one revision of one shard.

    For a delete, ``kv.value`` is empty, ``kv.version`` is 0 and ``kv.mod_rev``
    is the revision of the delete. ``prev`` is the key as it was before,
    where the watcher asked for it.
    """

    type: EventType
    kv: KeyValue
    shard: str = "/"
    prev: KeyValue | None = field(default=None)

    @property
    def key(self) -> str:
        return self.kv.key

    @property
    def rev(self) -> int:
        return self.kv.mod_rev


# --- transactions ------------------------------------------------------------

COMPARE_TARGETS = ("version", "mod-rev", "create-rev")
COMPARE_OPS = ("=", "!=", "<", ">")


@dataclass(frozen=True, slots=True)
class Compare:
    """A condition of a transaction: ``target op value`` on one key.

    ``target`` is version, mod-rev or create-rev; a missing key has 0 for all
    three (so ``Compare(key, "version", "=", 0)`` means "does not exist").
    """

    key: str
    target: str = "version"
    op: str = "="
    value: int = 0

    def holds(self, current: KeyValue | None) -> bool:
        actual = 0
        if current is not None:
            actual = {"version": current.version, "mod-rev": current.mod_rev,
                      "create-rev": current.create_rev}[self.target]
        return {"=": actual == self.value, "!=": actual != self.value,
                "<": actual < self.value, ">": actual > self.value}[self.op]


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    ephemeral: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: str
    prefix: bool = False
    limit: int | None = None


TxnOp = Put | Delete | Get
