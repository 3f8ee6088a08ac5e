"""The wire format: the kvstore payloads of IQ and presence stanzas.

Every class here is a slixmpp ``ElementBase`` that declares its element name,
namespace and interfaces, as slixmpp's own plugins do. Values travel as
base64 text. Numbers travel as decimal attributes; a malformed number raises
:class:`~protocol.errors.BadRequest`, so a node answers bad input with a
clear error instead of failing. Records (a single get's answer, subtree
pages, watch pushes, transactions) travel as one text node, base64 of
msgpack, and are read straight from it rather than wrapped one object each:
the XML server parses and rebuilds every element and attribute it routes,
and a page of a thousand keys would otherwise cost a thousand wrapper
objects.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack
from slixmpp.xmlstream import ET, ElementBase

from protocol import model, xmltext
from protocol.errors import APPLICATION_CONDITIONS, BadRequest, KvError, from_condition
from protocol.model import Event, EventType, KeyValue

NS = "urn:x-kvstore:1"
"""The protocol namespace; the trailing number is the protocol version."""

STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"

_SHARD = f"{{{NS}}}shard"


def encode_value(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def decode_value(text: str | None) -> bytes:
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("value is not valid base64") from None


def parse_int(text: str | None, name: str, *, default: int | None = None,
              minimum: int = 0) -> int | None:
    """Read a decimal attribute; absent gives ``default``, junk raises BadRequest."""
    if text is None or text == "":
        return default
    if not text.isascii() or not text.removeprefix("-").isdigit() or len(text) > 20:
        raise BadRequest(f"attribute {name!r} must be an integer, not {text!r}")
    number = int(text)
    if number < minimum:
        raise BadRequest(f"attribute {name!r} must be at least {minimum}, not {number}")
    return number


def parse_bool(text: str | None, name: str) -> bool:
    if text is None or text in ("", "false", "0"):
        return False
    if text in ("true", "1"):
        return True
    raise BadRequest(f"attribute {name!r} must be true or false, not {text!r}")


class KvElement(ElementBase):
    """Common helpers for the project's payload elements."""

    namespace = NS

    def attr(self, name: str) -> str | None:
        return self.xml.get(name)

    def int_attr(self, name: str, default: int | None = None, minimum: int = 0) -> int | None:
        return parse_int(self.xml.get(name), name, default=default, minimum=minimum)

    def bool_attr(self, name: str) -> bool:
        return parse_bool(self.xml.get(name), name)

    def set_attrs(self, **attrs: str | int | bool | None) -> None:
        """Set attributes by keyword (``if_version`` -> ``if-version``); None removes."""
        for name, value in attrs.items():
            name = name.replace("_", "-")
            if value is None or value is False:
                self.xml.attrib.pop(name, None)
            elif value is True:
                self.xml.set(name, "true")
            else:
                self.xml.set(name, str(value))

    @property
    def key(self) -> str | None:
        return self.xml.get("key")

    @property
    def shard(self) -> str | None:
        return self.xml.get("shard")


def _keyless_record(kv: KeyValue) -> list[Any]:
    """``[value, version, create_rev, mod_rev, ephemeral]``: a record whose key is known."""
    return [kv.value, kv.version, kv.create_rev, kv.mod_rev, bool(kv.ephemeral)]


def _from_keyless_record(key: str, record: Any) -> KeyValue:
    value, version, create_rev, mod_rev, ephemeral = record
    if not isinstance(value, bytes | None) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in (version, create_rev, mod_rev)):
        raise TypeError("record fields")
    return KeyValue(key, value or b"", version, create_rev, mod_rev,
                    "true" if ephemeral else None)


def item_text(kv: KeyValue, rev: int) -> str:
    """A single get's answer: ``<item rev=>`` and the record as base64 of msgpack.

    The record is keyless (the asker knows its key), as a watch event's
    previous record is. The revisions travel in the text rather than as
    attributes: this is the store's most frequent answer, and every attribute
    costs the XMPP server a parse and a rebuild (four fewer took Prosody's
    time per answer from 66 to 62 us).
    """
    return f"<item xmlns='{NS}' rev='{rev}'>{_pack(_keyless_record(kv))}</item>"


def get_text(key: str) -> str:
    """A single get request as text."""
    return f"<get xmlns='{NS}' key='{xmltext.escape_attribute(key)}'/>"


def put_text(key: str, value: bytes, *, if_version: int | None = None,
             if_mod_rev: int | None = None, ephemeral: bool = False,
             lease: str | None = None) -> str:
    """A single put request as text: the :class:`Put` element, written straight to text."""
    extra = ""
    if if_version is not None:
        extra += f" if-version='{if_version}'"
    if if_mod_rev is not None:
        extra += f" if-mod-rev='{if_mod_rev}'"
    if ephemeral:
        extra += " ephemeral='true'"
    if lease is not None:
        extra += f" lease='{xmltext.escape_attribute(lease)}'"
    key_attr = xmltext.escape_attribute(key)
    if not value:
        return f"<put xmlns='{NS}' key='{key_attr}'{extra}/>"
    return f"<put xmlns='{NS}' key='{key_attr}'{extra}>{encode_value(value)}</put>"


def parse_item(element: ET.Element, key: str) -> KeyValue:
    """The record of ``key`` in a single get's answer (see :func:`item_text`)."""
    if not element.text:
        raise BadRequest("an item without its record")
    try:
        return _from_keyless_record(key, _unpack(element.text))
    except (TypeError, ValueError):
        raise BadRequest("a malformed record in an item") from None


class Item(KvElement):
    """A single get's answer: ``<item rev='17'>base64 of msgpack</item>`` (:func:`item_text`)."""

    name = "item"
    plugin_attrib = "item"
    interfaces = {"rev"}


class Get(KvElement):
    """Read one key, or a subtree with ``prefix='true'``.

    Request attributes: key, shard, prefix, limit, after (a key: resume after
    it), keys-only. A single key is answered with its ``<item/>`` (see
    :func:`item_text`). A subtree page is answered with ``<get rev= more=>``
    (rev: the shard revision served at; more: a limit cut the page short)
    whose text is base64 of a msgpack list of records in tree order,
    ``[key, value, version, create_rev, mod_rev, ephemeral]`` (value nil with
    keys-only): one text node for the server to route, not an element per key.
    """

    name = "get"
    plugin_attrib = "kv_get"
    interfaces = {"key", "shard", "prefix", "limit", "after", "keys-only", "rev", "more"}

    def set_items(self, kvs: Iterable[KeyValue], *, with_value: bool = True) -> None:
        records = [[kv.key, kv.value if with_value else None, kv.version, kv.create_rev,
                    kv.mod_rev, bool(kv.ephemeral)] for kv in kvs]
        self.xml.text = _pack(records) if records else None

    def items(self) -> list[KeyValue]:
        if not self.xml.text:
            return []
        try:
            return [KeyValue(key, value or b"", version, create_rev, mod_rev,
                             "true" if ephemeral else None)
                    for key, value, version, create_rev, mod_rev, ephemeral
                    in _unpack(self.xml.text)]
        except (TypeError, ValueError):
            raise BadRequest("malformed records in a get answer") from None


class Put(KvElement):
    """Write one key: ``<put key= [if-version=] [if-mod-rev=] [ephemeral=]>base64</put>``.

    ``if-version='0'`` means the key must not exist. The result echoes the
    key's new rev, version, create-rev and mod-rev.
    """

    name = "put"
    plugin_attrib = "kv_put"
    interfaces = {"key", "shard", "if-version", "if-mod-rev", "ephemeral", "lease", "rev",
                  "version", "create-rev", "mod-rev"}

    @property
    def value(self) -> bytes:
        return decode_value(self.xml.text)

    @value.setter
    def value(self, data: bytes) -> None:
        self.xml.text = encode_value(data) if data else None


class Delete(KvElement):
    """Delete one key, or a subtree with ``prefix='true'``; result: rev and deleted count."""

    name = "delete"
    plugin_attrib = "kv_delete"
    interfaces = {"key", "shard", "prefix", "if-version", "if-mod-rev", "rev", "deleted"}


class ListChildren(KvElement):
    """List the direct children of a key, by name, sorted, paginated.

    Request attributes: key, shard, after (a child name), limit. Result: rev,
    more, and as text the names joined by ``/`` (the one character no name
    contains): ten thousand names are one text node, not ten thousand
    elements for the server to parse and rebuild.
    """

    name = "list"
    plugin_attrib = "kv_list"
    interfaces = {"key", "shard", "after", "limit", "rev", "more"}

    def add_children(self, names: Iterable[str]) -> None:
        self.xml.text = "/".join(names) or None

    def children(self) -> list[str]:
        text = self.xml.text
        return text.split("/") if text else []


class ShardList(KvElement):
    """Shards carried by a node's presence, or reported by ``<status/>``.

    ``<shard prefix='/a'/>`` in presence; status adds rev, compact-rev and keys.
    """

    def add_shard(self, prefix: str, **attrs: int | str) -> None:
        element = ET.SubElement(self.xml, _SHARD, {"prefix": prefix})
        for name, value in attrs.items():
            element.set(name.replace("_", "-"), str(value))

    def shards(self) -> list[dict[str, str]]:
        return [dict(child.attrib) for child in self.xml if child.tag == _SHARD]


class Shards(ShardList):
    """Presence payload: the shards a storage node serves."""

    name = "shards"
    plugin_attrib = "kv_shards"
    interfaces: set[str] = set()


class Status(ShardList):
    """Node status: ``<status/>`` asks; the answer lists each shard with its revision."""

    name = "status"
    plugin_attrib = "kv_status"
    interfaces = {"jid"}


class Watch(KvElement):
    """Start a watch on a key or a subtree of one shard.

    Request attributes: id (chosen by the watcher, unique among its watches),
    key, shard, prefix, start-rev (the first revision wanted; absent means
    "from now"), prev-kv (send each key's previous value), progress (send
    progress notices while idle). The result confirms id, shard and the
    start-rev the watch really starts at.
    """

    name = "watch"
    plugin_attrib = "kv_watch"
    interfaces = {"id", "key", "shard", "prefix", "start-rev", "prev-kv", "progress"}


class Cancel(KvElement):
    """Cancel a watch: ``<cancel id='w1'/>``; the result says whether it was found."""

    name = "cancel"
    plugin_attrib = "kv_cancel"
    interfaces = {"id", "found"}


class Events(KvElement):
    """Pushed by a node to a watcher in an IQ set; the watcher answers with a result.

    Attributes: watch (the id), shard, rev (the watcher has now seen every
    change of the shard up to this revision), more (the last revision goes on
    in the next push: its events are delivered together, never split), and
    cancelled (the node ended the watch: ``lagging`` if the watcher fell too
    far behind, ``compacted`` if the history it needed is gone). The text is
    base64 of a msgpack list of events, ``[type, key, value, version,
    create_rev, mod_rev, ephemeral, prev]`` with type ``put`` or ``delete``
    and prev nil or ``[value, version, create_rev, mod_rev, ephemeral]``. An
    ``<events/>`` with no text is a progress notice.
    """

    name = "events"
    plugin_attrib = "kv_events"
    interfaces = {"watch", "shard", "rev", "more", "cancelled"}

    def set_events(self, events: Iterable[Event], *, with_prev: bool = False) -> None:
        packed = []
        for event in events:
            kv, prev = event.kv, event.prev if with_prev else None
            packed.append([event.type.value, kv.key, kv.value, kv.version, kv.create_rev,
                           kv.mod_rev, bool(kv.ephemeral),
                           _keyless_record(prev) if prev is not None else None])
        self.xml.text = _pack(packed) if packed else None

    def events(self) -> list[Event]:
        shard = self.xml.get("shard") or "/"
        if not self.xml.text:
            return []
        found = []
        try:
            for kind, key, value, version, create_rev, mod_rev, ephemeral, prev in \
                    _unpack(self.xml.text):
                kv = KeyValue(key, value or b"", version, create_rev, mod_rev,
                              "true" if ephemeral else None)
                prev_kv = _from_keyless_record(key, prev) if prev is not None else None
                found.append(Event(EventType(kind), kv, shard, prev_kv))
        except (TypeError, ValueError):
            raise BadRequest("malformed events in a push") from None
        return found


class Lease(KvElement):
    """A lease: keys bound to it die when its holder stops refreshing it.

    ``<lease action='grant' ttl='10'/>`` answers ``<lease id='..' ttl='10'/>``;
    ``action='keepalive' id=..`` restarts its clock; ``action='revoke' id=..``
    deletes its keys now. A put names it with ``lease='ID'``. For writers
    whose presence the node cannot see; leases live on the node that granted
    them.
    """

    name = "lease"
    plugin_attrib = "kv_lease"
    interfaces = {"action", "id", "ttl", "deleted"}


def _pack(value: Any) -> str:
    return encode_value(msgpack.packb(value, use_bin_type=True))


def _unpack(text: str | None) -> Any:
    try:
        return msgpack.unpackb(decode_value(text), raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise BadRequest(f"a payload that is not valid msgpack: {exc}") from None


def _step_to_wire(step: model.TxnOp) -> list[Any]:
    if isinstance(step, model.Put):
        return ["put", step.key, step.value, step.ephemeral]
    if isinstance(step, model.Delete):
        return ["delete", step.key, step.prefix]
    return ["get", step.key, step.prefix, step.limit]


def _step_from_wire(raw: Any) -> model.TxnOp:
    try:
        kind, key, *rest = raw
        if not isinstance(key, str) or not key:
            raise TypeError("key")
        if kind == "put":
            value, ephemeral = rest
            if not isinstance(value, bytes):
                raise TypeError("value")
            return model.Put(key, value, bool(ephemeral))
        if kind == "delete":
            (prefix,) = rest
            return model.Delete(key, bool(prefix))
        if kind == "get":
            prefix, limit = rest
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise TypeError("limit")
            return model.Get(key, bool(prefix), limit)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"malformed transaction step {raw!r:.80}: {exc}") from None
    raise BadRequest(f"a transaction step is put, delete or get, not {kind!r:.20}")


def _compare_from_wire(raw: Any) -> model.Compare:
    try:
        key, target, op, value = raw
    except (TypeError, ValueError):
        raise BadRequest(f"malformed compare {raw!r:.80}") from None
    if not isinstance(key, str) or not key or target not in model.COMPARE_TARGETS or \
            op not in model.COMPARE_OPS or not isinstance(value, int) or value < 0:
        raise BadRequest(f"bad compare {raw!r:.80}")
    return model.Compare(key, target, op, value)


class Txn(KvElement):
    """A transaction within one shard (etcd's Txn), its body in msgpack.

    The text is base64 of a msgpack map: ``compare`` (a list of ``[key,
    target, op, value]`` with target version, mod-rev or create-rev and op
    ``=``, ``!=``, ``<`` or ``>``), ``success`` and ``failure`` (lists of
    steps ``["put", key, value, ephemeral]``, ``["delete", key, prefix]``,
    ``["get", key, prefix, limit]``). If every compare holds the success steps
    run, else the failure steps; their writes share one revision. The answer
    carries ``rev`` and ``succeeded`` attributes and, as its text, a msgpack
    list with one result per step run: ``["put", version, create_rev,
    mod_rev]``, ``["delete", count]``, ``["get", [[key, value, version,
    create_rev, mod_rev], ...]]``. msgpack rather than one element per step:
    a batch of 100 puts is then one text node for the server to route, not
    a hundred elements to parse and rebuild.
    """

    name = "txn"
    plugin_attrib = "kv_txn"
    interfaces = {"shard", "rev", "succeeded"}

    def set_request(self, compares: Iterable[model.Compare], success: Iterable[model.TxnOp],
                    failure: Iterable[model.TxnOp]) -> None:
        self.xml.text = _pack({
            "compare": [[c.key, c.target, c.op, c.value] for c in compares],
            "success": [_step_to_wire(step) for step in success],
            "failure": [_step_to_wire(step) for step in failure],
        })

    def request(self) -> tuple[list[model.Compare], list[model.TxnOp], list[model.TxnOp]]:
        body = _unpack(self.xml.text)
        if not isinstance(body, dict):
            raise BadRequest("a transaction body is a map")
        unknown = set(body) - {"compare", "success", "failure"}
        if unknown:
            raise BadRequest(f"unknown transaction fields {sorted(map(str, unknown))}")
        lists = [body.get(name) or [] for name in ("compare", "success", "failure")]
        if not all(isinstance(items, list) for items in lists):
            raise BadRequest("compare, success and failure are lists")
        return ([_compare_from_wire(c) for c in lists[0]],
                [_step_from_wire(s) for s in lists[1]],
                [_step_from_wire(s) for s in lists[2]])

    def add_results(self, results: Iterable[Any], *, rev: int) -> None:
        packed: list[Any] = []
        for result in results:
            if isinstance(result, KeyValue):
                packed.append(["put", result.version, result.create_rev, result.mod_rev])
            elif isinstance(result, int):
                packed.append(["delete", result])
            else:
                packed.append(["get", [[kv.key, kv.value, kv.version, kv.create_rev,
                                        kv.mod_rev] for kv in result]])
        self.xml.text = _pack(packed)

    def results(self) -> list[Any]:
        parsed: list[Any] = []
        for entry in _unpack(self.xml.text) or []:
            kind = entry[0]
            if kind == "put":
                parsed.append(dict(zip(("version", "create-rev", "mod-rev"), entry[1:],
                                       strict=True)))
            elif kind == "delete":
                parsed.append(entry[1])
            else:
                parsed.append([KeyValue(k, v, ver, c, m) for k, v, ver, c, m in entry[1]])
        return parsed


REQUESTS: tuple[type[KvElement], ...] = (Get, Put, Delete, ListChildren, Status, Watch, Cancel,
                                         Events, Txn, Lease)


def error_condition(error: KvError) -> ET.Element:
    """The application-specific condition element for an error stanza."""
    attrs = {name: str(value) for name, value in error.details.items()}
    return ET.Element(f"{{{error.namespace or NS}}}{error.condition}", attrs)


def parse_error(error: ET.Element | None) -> KvError:
    """Rebuild a :class:`KvError` from an ``<error/>`` element."""
    if error is None:
        return KvError("error stanza without an error element")
    condition = xmpp_condition = None
    details: dict[str, str] = {}
    text = ""
    for child in error:
        namespace, _, name = child.tag[1:].partition("}")
        if namespace == STANZAS_NS:
            if name == "text":
                text = child.text or ""
            else:
                xmpp_condition = name
        elif namespace == NS or (namespace, name) in APPLICATION_CONDITIONS:
            condition = name
            details = dict(child.attrib)
    return from_condition(condition, xmpp_condition, text, details)


def iter_children(element: ET.Element, tag: str) -> Iterator[ET.Element]:
    return (child for child in element if child.tag == tag)
