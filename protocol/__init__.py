"""The kvstore wire protocol: keys, the data model, errors and stanzas. No I/O."""

from protocol import keys
from protocol.errors import (
    BadRequest,
    Compacted,
    Forbidden,
    InvalidKey,
    KeyNotFound,
    KvError,
    LeaseNotFound,
    NotOwner,
    ResourceLimit,
    StorageFull,
    Timeout,
    Unavailable,
    ValueTooLarge,
    VersionMismatch,
)
from protocol.model import Event, EventType, KeyValue
from protocol.stanza import NS

__all__ = [
    "NS",
    "BadRequest",
    "Compacted",
    "Event",
    "EventType",
    "Forbidden",
    "InvalidKey",
    "KeyNotFound",
    "KeyValue",
    "KvError",
    "LeaseNotFound",
    "NotOwner",
    "ResourceLimit",
    "StorageFull",
    "Timeout",
    "Unavailable",
    "ValueTooLarge",
    "VersionMismatch",
    "keys",
]
