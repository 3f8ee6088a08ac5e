"""Error conditions: one exception class per condition, shared by both ends.

On the wire an error is a standard XMPP error (RFC 6120 section 8.3) whose
defined condition tells a generic XMPP client what kind of failure it is, plus
an application-specific condition element in the project's namespace that
tells a kvstore client exactly which one. ``CONDITIONS`` maps the latter to
the exception class; the node raises these, the client re-raises them.
"""

from __future__ import annotations

from typing import ClassVar


class KvError(Exception):
    """Base of every error the store reports."""

    condition: ClassVar[str] = "internal-error"
    """Application-specific condition element name."""
    namespace: ClassVar[str | None] = None
    """The condition element's namespace; None means the kvstore namespace."""
    xmpp_condition: ClassVar[str] = "internal-server-error"
    xmpp_type: ClassVar[str] = "cancel"

    def __init__(self, message: str = "", **details: str | int | None) -> None:
        super().__init__(message or self.condition)
        self.message = message or self.condition
        self.details = {k: v for k, v in details.items() if v is not None}

    def __str__(self) -> str:
        return self.message


class KeyNotFound(KvError):
    condition = "key-not-found"
    xmpp_condition = "item-not-found"


class LeaseNotFound(KeyNotFound):
    """The lease expired, was revoked, or never existed on this node."""

    condition = "lease-not-found"


class VersionMismatch(KvError):
    """A compare failed; ``details`` carries the key's current version and mod-rev."""

    condition = "version-mismatch"
    xmpp_condition = "conflict"

    @property
    def current_version(self) -> int:
        return int(self.details.get("current-version", 0))

    @property
    def current_mod_rev(self) -> int:
        return int(self.details.get("current-mod-rev", 0))


class NotOwner(KvError):
    """The node does not own the key; ``details['shard']`` names the shard that does."""

    condition = "not-owner"
    xmpp_condition = "not-acceptable"

    @property
    def shard(self) -> str | None:
        value = self.details.get("shard")
        return str(value) if value is not None else None


class Unavailable(KvError):
    """No storage node that owns the key is reachable, or the store is down."""

    condition = "unavailable"
    xmpp_condition = "service-unavailable"
    xmpp_type = "wait"


class Timeout(Unavailable):
    """An operation got no answer in time."""

    condition = "timeout"
    xmpp_condition = "remote-server-timeout"


class Forbidden(KvError):
    condition = "forbidden"
    xmpp_condition = "forbidden"
    xmpp_type = "auth"


class BadRequest(KvError):
    """The request itself is malformed: a missing attribute, a bad number, bad base64."""

    condition = "bad-request"
    xmpp_condition = "bad-request"
    xmpp_type = "modify"


class InvalidKey(BadRequest):
    condition = "invalid-key"


class ValueTooLarge(BadRequest):
    condition = "too-large"
    xmpp_condition = "policy-violation"


class Compacted(KvError):
    """A watch asked for history the shard no longer holds.

    ``details['compact-rev']`` is the newest revision already discarded: a
    watch may start at ``compact_rev + 1`` or later.
    """

    condition = "compacted"
    xmpp_condition = "item-not-found"

    @property
    def compact_rev(self) -> int:
        return int(self.details.get("compact-rev", 0))


class StorageFull(KvError):
    """The node cannot take more writes (disk or map full); reads keep working."""

    condition = "storage-full"
    xmpp_condition = "resource-constraint"
    xmpp_type = "wait"


class ResourceLimit(KvError):
    """A per-client limit was reached (requests in flight, watches)."""

    condition = "limit-reached"
    xmpp_condition = "resource-constraint"
    xmpp_type = "wait"


CONDITIONS: dict[str, type[KvError]] = {
    cls.condition: cls
    for cls in (
        KvError,
        KeyNotFound,
        LeaseNotFound,
        VersionMismatch,
        NotOwner,
        Unavailable,
        Timeout,
        Forbidden,
        BadRequest,
        InvalidKey,
        ValueTooLarge,
        Compacted,
        StorageFull,
        ResourceLimit,
    )
}

APPLICATION_CONDITIONS: dict[tuple[str, str], type[KvError]] = {}
"""(namespace, condition) -> class, for conditions outside the kvstore namespace."""


def register_condition(cls: type[KvError]) -> type[KvError]:
    """Make a condition of another protocol (the agents') known to ``parse_error``."""
    CONDITIONS[cls.condition] = cls
    if cls.namespace:
        APPLICATION_CONDITIONS[(cls.namespace, cls.condition)] = cls
    return cls


# How a client reads an error that carries no kvstore condition (one the XMPP
# server generated, for instance, when the addressed node is offline).
XMPP_CONDITIONS: dict[str, type[KvError]] = {
    "service-unavailable": Unavailable,
    "recipient-unavailable": Unavailable,
    "remote-server-not-found": Unavailable,
    "remote-server-timeout": Timeout,
    "item-not-found": Unavailable,
    "forbidden": Forbidden,
    "not-authorized": Forbidden,
    "bad-request": BadRequest,
    "policy-violation": ValueTooLarge,
    "feature-not-implemented": BadRequest,
    "resource-constraint": ResourceLimit,
}


def from_condition(condition: str | None, xmpp_condition: str | None, text: str,
                   details: dict[str, str] | None = None) -> KvError:
    """Rebuild the exception a node raised from the parts of an error stanza."""
    cls = CONDITIONS.get(condition or "")
    if cls is None:
        cls = XMPP_CONDITIONS.get(xmpp_condition or "", KvError)
    return cls(text or (condition or xmpp_condition or "error"), **(details or {}))
