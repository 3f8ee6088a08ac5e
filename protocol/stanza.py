"""The wire format: the kvstore payloads of IQ and presence stanzas.

Every class here is a slixmpp ``ElementBase`` that declares its element name,
namespace and interfaces, as slixmpp's own plugins do. Values travel as
base64 text. Numbers travel as decimal attributes; a malformed number raises
:class:`~protocol.errors.BadRequest`, so a node answers bad input with a
clear error instead of failing. Items and children are read straight from the
XML rather than wrapped one object each: a page of a thousand keys would
otherwise cost a thousand wrapper objects.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from typing import Any

from slixmpp.xmlstream import ET, ElementBase

from protocol import model
from protocol.errors import APPLICATION_CONDITIONS, BadRequest, KvError, from_condition
from protocol.model import Event, EventType, KeyValue

NS = "urn:x-kvstore:1"
"""The protocol namespace; the trailing number is the protocol version."""

STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"

_ITEM = f"{{{NS}}}item"
_CHILD = f"{{{NS}}}child"
_SHARD = f"{{{NS}}}shard"
_EVENT = f"{{{NS}}}event"
_PREV = f"{{{NS}}}prev"


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


def item_element(kv: KeyValue, *, with_value: bool = True) -> ET.Element:
    """``<item key= version= create-rev= mod-rev=>base64</item>``."""
    attrs = {
        "key": kv.key,
        "version": str(kv.version),
        "create-rev": str(kv.create_rev),
        "mod-rev": str(kv.mod_rev),
    }
    if kv.ephemeral:
        attrs["ephemeral"] = "true"
    element = ET.Element(_ITEM, attrs)
    if with_value and kv.value:
        element.text = encode_value(kv.value)
    return element


def parse_item(element: ET.Element) -> KeyValue:
    key = element.get("key")
    if not key:
        raise BadRequest("item without a key")
    return KeyValue(
        key=key,
        value=decode_value(element.text),
        version=parse_int(element.get("version"), "version", default=0) or 0,
        create_rev=parse_int(element.get("create-rev"), "create-rev", default=0) or 0,
        mod_rev=parse_int(element.get("mod-rev"), "mod-rev", default=0) or 0,
        ephemeral="true" if element.get("ephemeral") == "true" else None,
    )


class Item(KvElement):
    """One stored key: ``<item key='/a' version='1' create-rev='3' mod-rev='3'>dg==</item>``."""

    name = "item"
    plugin_attrib = "item"
    interfaces = {"key", "version", "create-rev", "mod-rev", "ephemeral"}


class Get(KvElement):
    """Read one key, or a subtree with ``prefix='true'``.

    Request attributes: key, shard, prefix, limit, after (a key: resume after
    it), keys-only. Result attributes: rev (the shard revision served at),
    more (a limit cut the answer short), then ``<item/>`` children in tree order.
    """

    name = "get"
    plugin_attrib = "kv_get"
    interfaces = {"key", "shard", "prefix", "limit", "after", "keys-only", "rev", "more"}

    def add_items(self, kvs: Iterable[KeyValue], *, with_value: bool = True) -> None:
        for kv in kvs:
            self.xml.append(item_element(kv, with_value=with_value))

    def items(self) -> list[KeyValue]:
        return [parse_item(child) for child in self.xml if child.tag == _ITEM]


class Put(KvElement):
    """Write one key: ``<put key= [if-version=] [if-mod-rev=] [ephemeral=]>base64</put>``.

    ``if-version='0'`` means the key must not exist. The result echoes the
    key's new rev, version, create-rev and mod-rev.
    """

    name = "put"
    plugin_attrib = "kv_put"
    interfaces = {"key", "shard", "if-version", "if-mod-rev", "ephemeral", "rev", "version",
                  "create-rev", "mod-rev"}

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
    more, and ``<child name='...'/>`` elements.
    """

    name = "list"
    plugin_attrib = "kv_list"
    interfaces = {"key", "shard", "after", "limit", "rev", "more"}

    def add_children(self, names: Iterable[str]) -> None:
        for name in names:
            ET.SubElement(self.xml, _CHILD, {"name": name})

    def children(self) -> list[str]:
        return [child.get("name", "") for child in self.xml if child.tag == _CHILD]


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


def event_element(event: Event, *, with_prev: bool = False) -> ET.Element:
    """``<event type='put'><item .../>[<prev .../>]</event>``."""
    element = ET.Element(_EVENT, {"type": event.type.value})
    element.append(item_element(event.kv))
    if with_prev and event.prev is not None:
        prev = item_element(event.prev)
        prev.tag = _PREV
        element.append(prev)
    return element


def parse_event(element: ET.Element, shard: str) -> Event:
    kind = element.get("type")
    if kind not in ("put", "delete"):
        raise BadRequest(f"unknown event type {kind!r}")
    kv = prev = None
    for child in element:
        if child.tag == _ITEM:
            kv = parse_item(child)
        elif child.tag == _PREV:
            prev = parse_item(child)
    if kv is None:
        raise BadRequest("event without an item")
    return Event(EventType(kind), kv, shard, prev)


class Events(KvElement):
    """Pushed by a node to a watcher in an IQ set; the watcher answers with a result.

    Attributes: watch (the id), shard, rev (the watcher has now seen every
    change of the shard up to this revision), more (the last revision goes on
    in the next push: its events are delivered together, never split), and
    cancelled (the node ended the watch: ``lagging`` if the watcher fell too
    far behind, ``compacted`` if the history it needed is gone). An
    ``<events/>`` with no children is a progress notice.
    """

    name = "events"
    plugin_attrib = "kv_events"
    interfaces = {"watch", "shard", "rev", "more", "cancelled"}

    def add_events(self, events: Iterable[Event], *, with_prev: bool = False) -> None:
        for event in events:
            self.xml.append(event_element(event, with_prev=with_prev))

    def events(self) -> list[Event]:
        shard = self.xml.get("shard") or "/"
        return [parse_event(child, shard) for child in self.xml if child.tag == _EVENT]


_COMPARE = f"{{{NS}}}compare"
_SUCCESS = f"{{{NS}}}success"
_FAILURE = f"{{{NS}}}failure"
_PUT = f"{{{NS}}}put"
_DELETE = f"{{{NS}}}delete"
_GET = f"{{{NS}}}get"


def _step_element(step: model.TxnOp) -> ET.Element:
    if isinstance(step, model.Put):
        element = ET.Element(_PUT, {"key": step.key})
        if step.ephemeral:
            element.set("ephemeral", "true")
        if step.value:
            element.text = encode_value(step.value)
        return element
    if isinstance(step, model.Delete):
        element = ET.Element(_DELETE, {"key": step.key})
    else:
        element = ET.Element(_GET, {"key": step.key})
        if step.limit is not None:
            element.set("limit", str(step.limit))
    if step.prefix:
        element.set("prefix", "true")
    return element


def _parse_step(element: ET.Element) -> model.TxnOp:
    key = element.get("key")
    if not key:
        raise BadRequest("a transaction step has no key")
    if element.tag == _PUT:
        return model.Put(key, decode_value(element.text),
                         parse_bool(element.get("ephemeral"), "ephemeral"))
    prefix = parse_bool(element.get("prefix"), "prefix")
    if element.tag == _DELETE:
        return model.Delete(key, prefix)
    if element.tag == _GET:
        return model.Get(key, prefix, parse_int(element.get("limit"), "limit", minimum=1))
    raise BadRequest(f"a transaction step must be put, delete or get, not {element.tag}")


class Txn(KvElement):
    """A transaction within one shard (etcd's Txn).

    ``<compare key= target='version|mod-rev|create-rev' op='=|!=|<|>' value=/>``
    elements, then ``<success>`` and ``<failure>`` holding ``<put>``,
    ``<delete>`` and ``<get>`` steps. If every compare holds the success steps
    run, else the failure steps; their writes share one revision. The result
    carries ``rev`` and ``succeeded``, then one element per step run: ``<put
    rev= version= create-rev= mod-rev=/>``, ``<delete deleted=/>``, ``<get>``
    with items.
    """

    name = "txn"
    plugin_attrib = "kv_txn"
    interfaces = {"shard", "rev", "succeeded"}

    def set_request(self, compares: Iterable[model.Compare], success: Iterable[model.TxnOp],
                    failure: Iterable[model.TxnOp]) -> None:
        for compare in compares:
            ET.SubElement(self.xml, _COMPARE, {"key": compare.key, "target": compare.target,
                                               "op": compare.op, "value": str(compare.value)})
        for tag, steps in ((_SUCCESS, success), (_FAILURE, failure)):
            branch = ET.SubElement(self.xml, tag)
            for step in steps:
                branch.append(_step_element(step))

    def request(self) -> tuple[list[model.Compare], list[model.TxnOp], list[model.TxnOp]]:
        compares: list[model.Compare] = []
        success: list[model.TxnOp] = []
        failure: list[model.TxnOp] = []
        for child in self.xml:
            if child.tag == _COMPARE:
                target, op = child.get("target", "version"), child.get("op", "=")
                if target not in model.COMPARE_TARGETS or op not in model.COMPARE_OPS:
                    raise BadRequest(f"bad compare: {target!r} {op!r}")
                key = child.get("key")
                if not key:
                    raise BadRequest("a compare has no key")
                value = parse_int(child.get("value"), "value", default=0, minimum=0) or 0
                compares.append(model.Compare(key, target, op, value))
            elif child.tag in (_SUCCESS, _FAILURE):
                steps = [_parse_step(step) for step in child]
                (success if child.tag == _SUCCESS else failure).extend(steps)
            else:
                raise BadRequest(f"unexpected element in a transaction: {child.tag}")
        return compares, success, failure

    def add_results(self, results: Iterable[Any], *, rev: int) -> None:
        for result in results:
            if isinstance(result, KeyValue):
                ET.SubElement(self.xml, _PUT, {
                    "rev": str(rev), "version": str(result.version),
                    "create-rev": str(result.create_rev), "mod-rev": str(result.mod_rev)})
            elif isinstance(result, int):
                ET.SubElement(self.xml, _DELETE, {"deleted": str(result)})
            else:
                found = ET.SubElement(self.xml, _GET)
                for kv in result:
                    found.append(item_element(kv))

    def results(self) -> list[Any]:
        parsed: list[Any] = []
        for child in self.xml:
            if child.tag == _PUT:
                parsed.append({name: parse_int(child.get(name), name, default=0)
                               for name in ("rev", "version", "create-rev", "mod-rev")})
            elif child.tag == _DELETE:
                parsed.append(parse_int(child.get("deleted"), "deleted", default=0))
            elif child.tag == _GET:
                parsed.append([parse_item(item) for item in child if item.tag == _ITEM])
        return parsed


REQUESTS: tuple[type[KvElement], ...] = (Get, Put, Delete, ListChildren, Status, Watch, Cancel,
                                         Events, Txn)


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
