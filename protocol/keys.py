"""Keys: validation, segment-wise prefix rules and the order results come in.

A key is ``/``-rooted; its segments are non-empty UTF-8 strings without ``/``,
control characters (they cannot travel in XML attributes intact), ``.`` or
``..``. The root ``/`` names the whole namespace: it can be listed, read as a
prefix and watched, but holds no value of its own.

Every prefix comparison in the project goes through this module, and all of
them are segment-wise: ``/cluster/ey04`` is a prefix of ``/cluster/ey04/slice``
but never of ``/cluster/ey040``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.errors import InvalidKey

ROOT = "/"
SEPARATOR = "/"

# C0 controls, DEL, C1 controls and the two XML non-characters.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ufffe\uffff]")


@dataclass(frozen=True)
class KeyLimits:
    """Bounds a storage node enforces on keys; both are configurable."""

    max_bytes: int = 500
    """LMDB caps its keys at 511 bytes; a node refuses a larger configured limit."""
    max_depth: int = 32


DEFAULT_LIMITS = KeyLimits()


def validate(key: object, limits: KeyLimits = DEFAULT_LIMITS, *, allow_root: bool = False) -> str:
    """Return ``key`` unchanged if it is valid, else raise :class:`InvalidKey`."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a string, not {type(key).__name__}")
    if key == ROOT:
        if allow_root:
            return key
        raise InvalidKey("the root '/' holds no value; use a key below it")
    if not key.startswith(SEPARATOR):
        raise InvalidKey(f"key must start with '/': {key!r}")
    if key.endswith(SEPARATOR):
        raise InvalidKey(f"key must not end with '/': {key!r}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey(f"key is not valid UTF-8: {key!r}") from None
    if size > limits.max_bytes:
        raise InvalidKey(f"key is {size} bytes, over the limit of {limits.max_bytes}")
    bad = _FORBIDDEN.search(key)
    if bad:
        raise InvalidKey(f"key contains a control character {bad.group()!r}: {key!r}")
    segments = key[1:].split(SEPARATOR)
    if len(segments) > limits.max_depth:
        raise InvalidKey(f"key has {len(segments)} segments, over the limit of {limits.max_depth}")
    for segment in segments:
        if not segment:
            raise InvalidKey(f"key has an empty segment: {key!r}")
        if segment in (".", ".."):
            raise InvalidKey(f"key has a {segment!r} segment: {key!r}")
    return key


def is_valid(key: object, limits: KeyLimits = DEFAULT_LIMITS, *, allow_root: bool = False) -> bool:
    try:
        validate(key, limits, allow_root=allow_root)
    except InvalidKey:
        return False
    return True


def segments(key: str) -> list[str]:
    """``/a/b`` -> ``['a', 'b']``; the root has no segments."""
    return [] if key == ROOT else key[1:].split(SEPARATOR)


def join(parent: str, *names: str) -> str:
    """Append segments to a key: ``join('/a', 'b')`` -> ``/a/b``."""
    base = "" if parent == ROOT else parent
    for name in names:
        base = f"{base}/{name}"
    return base or ROOT


def parent(key: str) -> str:
    """The key one segment up; the root is its own parent."""
    if key == ROOT:
        return ROOT
    head = key.rsplit(SEPARATOR, 1)[0]
    return head or ROOT


def depth(key: str) -> int:
    return 0 if key == ROOT else key.count(SEPARATOR)


def is_prefix(prefix: str, key: str) -> bool:
    """True if ``key`` equals ``prefix`` or lies in its subtree, segment-wise."""
    if prefix == ROOT:
        return True
    return key == prefix or key.startswith(prefix + SEPARATOR)


def is_strict_prefix(prefix: str, key: str) -> bool:
    """True if ``key`` lies strictly below ``prefix``."""
    return key != prefix and is_prefix(prefix, key)


def overlaps(a: str, b: str) -> bool:
    """True if one key is a segment-wise prefix of the other (either way)."""
    return is_prefix(a, b) or is_prefix(b, a)


def longest_prefix(key: str, prefixes: Iterable[str]) -> str | None:
    """The longest of ``prefixes`` that is a segment-wise prefix of ``key``."""
    best: str | None = None
    for prefix in prefixes:
        if is_prefix(prefix, key) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def child_name(parent_key: str, key: str) -> str:
    """The name of the child of ``parent_key`` on the way down to ``key``."""
    rest = key if parent_key == ROOT else key[len(parent_key) :]
    return rest[1:].split(SEPARATOR, 1)[0]


def tree_order(key: str) -> bytes:
    """The sort key for results: depth-first, siblings sorted by name.

    Encoding the separator as NUL (which no segment contains) makes a plain
    byte comparison walk the tree: a key sorts right before its own subtree,
    and ``/a/b/c`` sorts before ``/a/b-c`` because ``/a/b`` does. Storage nodes
    keep keys in this order and clients merge answers from several shards by
    it, so one ordering holds everywhere.
    """
    return b"" if key == ROOT else key.replace(SEPARATOR, "\0").encode("utf-8")


def from_tree_order(encoded: bytes) -> str:
    return encoded.decode("utf-8").replace("\0", SEPARATOR) or ROOT


def escape_segment(text: str) -> str:
    """Make any string (a full JID, say) usable as one segment: ``%`` and ``/`` escaped."""
    return text.replace("%", "%25").replace("/", "%2F")


def unescape_segment(segment: str) -> str:
    return segment.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")
