"""kvstore: a distributed hierarchical key-value store that speaks XMPP.

    async with kvstore.Client.from_config() as kv:
        await kv.put("/cluster/ey04/slice/13", b"up")
        item = await kv.get("/cluster/ey04/slice/13")
"""

from kvstore.client import Client, DeleteResult, ListResult, PutResult, RangeResult
from kvstore.config import ConnectionSettings
from kvstore.sync import SyncClient
from protocol.errors import (
    BadRequest,
    Compacted,
    Forbidden,
    InvalidKey,
    KeyNotFound,
    KvError,
    NotOwner,
    StorageFull,
    Timeout,
    Unavailable,
    ValueTooLarge,
    VersionMismatch,
)
from protocol.model import Event, EventType, KeyValue

__all__ = [
    "BadRequest",
    "Client",
    "Compacted",
    "ConnectionSettings",
    "DeleteResult",
    "Event",
    "EventType",
    "Forbidden",
    "InvalidKey",
    "KeyNotFound",
    "KeyValue",
    "KvError",
    "ListResult",
    "NotOwner",
    "PutResult",
    "RangeResult",
    "StorageFull",
    "SyncClient",
    "Timeout",
    "Unavailable",
    "ValueTooLarge",
    "VersionMismatch",
]
