"""Unit tests for protocol.stanza and protocol.errors: the wire format, without a server."""

from __future__ import annotations

import base64
import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from slixmpp.xmlstream import ET

from kvstore import xmpp
from protocol import errors, xmltext
from protocol import stanza as wire
from protocol.errors import (
    BadRequest,
    Compacted,
    Forbidden,
    KvError,
    NotOwner,
    ResourceLimit,
    Timeout,
    Unavailable,
    ValueTooLarge,
    VersionMismatch,
)
from protocol.model import Event, EventType, KeyValue


def reparse(element: ET.Element) -> ET.Element:
    """Serialize and parse again, as the element would travel."""
    return ET.fromstring(ET.tostring(element))


def reparse_text(text: str) -> ET.Element:
    """Parse a payload written as text, inside an IQ as it travels."""
    return ET.fromstring(f"<iq xmlns='jabber:client'>{text}</iq>")[0]


# --- values and numbers ---------------------------------------------------------


@given(st.binary(max_size=2048))
def test_base64_value_round_trip(value: bytes) -> None:
    text = wire.encode_value(value)
    assert text.isascii()
    assert wire.decode_value(text) == value


def test_empty_and_absent_values_decode_to_empty_bytes() -> None:
    assert wire.decode_value(None) == b""
    assert wire.decode_value("") == b""
    assert wire.encode_value(b"") == ""


@pytest.mark.parametrize("junk", ["@@@@", "abc", "ab=c", "YQ==YQ==x", "YW Jj", "ä"])
def test_bad_base64_is_a_bad_request(junk: str) -> None:
    with pytest.raises(BadRequest, match="base64"):
        wire.decode_value(junk)


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), ("7", 7), ("18446744073709551615", 2**64 - 1), ("0007", 7),
])
def test_parse_int_accepts_decimals(text: str, expected: int) -> None:
    assert wire.parse_int(text, "n") == expected


def test_parse_int_absent_gives_the_default() -> None:
    assert wire.parse_int(None, "n") is None
    assert wire.parse_int("", "n", default=5) == 5


def test_parse_int_minimum() -> None:
    assert wire.parse_int("-3", "n", minimum=-5) == -3
    with pytest.raises(BadRequest, match="at least 1"):
        wire.parse_int("0", "limit", minimum=1)
    with pytest.raises(BadRequest, match="at least 0"):
        wire.parse_int("-1", "n")


@pytest.mark.parametrize("junk", [
    "x", "1.5", "1e3", "0x10", " 1", "1 ", "+1", "-", "--5", "-5-", "1_000", "٣", "²",
    "1" * 21, "\uff11",
])
def test_parse_int_rejects_junk_with_bad_request(junk: str) -> None:
    with pytest.raises(BadRequest, match="'n'"):
        wire.parse_int(junk, "n", minimum=-(10**30))


@pytest.mark.parametrize(("text", "expected"), [
    (None, False), ("", False), ("false", False), ("0", False), ("true", True), ("1", True),
])
def test_parse_bool(text: str | None, expected: bool) -> None:
    assert wire.parse_bool(text, "b") is expected


@pytest.mark.parametrize("junk", ["yes", "True", "TRUE", "2", " true", "on", "no"])
def test_parse_bool_rejects_junk_with_bad_request(junk: str) -> None:
    with pytest.raises(BadRequest, match="'b'"):
        wire.parse_bool(junk, "b")


def test_int_attrs_of_elements_raise_bad_request() -> None:
    get = wire.Get()
    get.xml.set("limit", "ten")
    with pytest.raises(BadRequest):
        get.int_attr("limit")
    get.set_attrs(limit=10, keys_only=True, after=None)
    assert get.int_attr("limit") == 10
    assert get.xml.get("keys-only") == "true"
    assert get.bool_attr("keys-only") is True
    get.set_attrs(keys_only=False)
    assert get.xml.get("keys-only") is None


# --- items, children, events ----------------------------------------------------

kv_keys = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"),
                                   blacklist_characters="/\ufffe\uffff"),
            min_size=1, max_size=8).filter(lambda s: s not in (".", "..")),
    min_size=1, max_size=3,
).map(lambda parts: "/" + "/".join(parts))
revs = st.integers(min_value=0, max_value=2**63)
key_values = st.builds(
    KeyValue,
    key=kv_keys,
    value=st.binary(max_size=64),
    version=revs,
    create_rev=revs,
    mod_rev=revs,
    ephemeral=st.sampled_from([None, "true"]),
)


@given(st.lists(key_values, max_size=10))
def test_items_round_trip(kvs: list[KeyValue]) -> None:
    get = wire.Get()
    get.set_attrs(rev=42, more=True)
    get.set_items(kvs)
    parsed = wire.Get(xml=reparse(get.xml))
    assert parsed.items() == kvs
    assert parsed.int_attr("rev") == 42
    assert parsed.bool_attr("more") is True


@given(st.lists(key_values, max_size=5))
def test_keys_only_items_carry_no_value(kvs: list[KeyValue]) -> None:
    get = wire.Get()
    get.set_items(kvs, with_value=False)
    parsed = wire.Get(xml=reparse(get.xml)).items()
    assert [kv.key for kv in parsed] == [kv.key for kv in kvs]
    assert all(kv.value == b"" for kv in parsed)
    assert [kv.mod_rev for kv in parsed] == [kv.mod_rev for kv in kvs]


@given(key_values, revs)
def test_a_single_gets_answer_round_trips(kv: KeyValue, rev: int) -> None:
    element = reparse_text(wire.item_text(kv, rev))
    assert element.tag == f"{{{wire.NS}}}item"
    assert set(element.attrib) == {"rev"}  # the record travels as one text node
    assert wire.Item(xml=element).int_attr("rev") == rev
    assert wire.parse_item(element, kv.key) == kv


def test_item_with_an_owner_jid_says_only_that_it_is_ephemeral() -> None:
    kv = KeyValue("/a", b"v", 1, 2, 3, ephemeral="agent@host/res")
    text = wire.item_text(kv, 5)
    assert "agent@host" not in text
    assert wire.parse_item(reparse_text(text), "/a").ephemeral == "true"


@pytest.mark.parametrize("body", [
    None,                                         # no record at all
    "bm90IG1zZ3BhY2s=",                           # base64, not msgpack
    "!!",                                         # not base64
    wire._pack([b"v", 1, 2]),                     # too short
    wire._pack([b"v", "one", 2, 3, False]),       # a revision that is not a number
    wire._pack(["text", 1, 2, 3, False]),         # a value that is not bytes
])
def test_a_malformed_item_is_a_bad_request(body: str | None) -> None:
    element = ET.Element(f"{{{wire.NS}}}item", {"rev": "4"})
    element.text = body
    with pytest.raises(BadRequest):
        wire.parse_item(element, "/a")


@given(st.lists(st.text(min_size=1, max_size=10,
                        alphabet=st.characters(blacklist_categories=("Cs", "Cc"),
                                               blacklist_characters="/\ufffe\uffff")),
                max_size=20))
def test_children_round_trip(names: list[str]) -> None:
    listing = wire.ListChildren()
    listing.add_children(names)
    assert wire.ListChildren(xml=reparse(listing.xml)).children() == names


def test_children_with_xml_special_characters() -> None:
    names = ["<a>", "&amp;", "\"q'", "]]>", "日本"]
    listing = wire.ListChildren()
    listing.add_children(names)
    assert wire.ListChildren(xml=reparse(listing.xml)).children() == names


events = st.builds(
    # An event's previous record is of the same key.
    lambda kind, kv, prev: Event(kind, kv, "/shard",
                                 dataclasses.replace(prev, key=kv.key) if prev else None),
    st.sampled_from(list(EventType)),
    key_values,
    st.one_of(st.none(), key_values),
)


@given(st.lists(events, max_size=8))
def test_events_round_trip_with_prev(evs: list[Event]) -> None:
    payload = wire.Events()
    payload.set_attrs(watch="w1", shard="/shard", rev=9, more=True)
    payload.set_events(evs, with_prev=True)
    parsed = wire.Events(xml=reparse(payload.xml))
    assert parsed.events() == evs
    assert parsed.xml.get("watch") == "w1"
    assert parsed.int_attr("rev") == 9
    assert parsed.bool_attr("more")


@given(st.lists(events, max_size=8))
def test_events_round_trip_without_prev(evs: list[Event]) -> None:
    payload = wire.Events()
    payload.set_attrs(shard="/shard")
    payload.set_events(evs)
    parsed = wire.Events(xml=reparse(payload.xml)).events()
    assert parsed == [Event(e.type, e.kv, e.shard, None) for e in evs]


def test_events_shard_defaults_to_root_and_empty_events_is_progress() -> None:
    payload = wire.Events()
    assert wire.Events(xml=reparse(payload.xml)).events() == []
    payload.set_events([Event(EventType.PUT, KeyValue("/a", b"x", 1, 1, 1))])
    assert wire.Events(xml=reparse(payload.xml)).events()[0].shard == "/"


def test_bad_events_are_bad_requests() -> None:
    payload = wire.Events()
    payload.xml.text = base64.b64encode(
        msgpack.packb([["modify", "/a", b"", 1, 1, 1, False, None]])).decode()
    with pytest.raises(BadRequest):
        payload.events()
    payload.xml.text = base64.b64encode(msgpack.packb([["put", "/a"]])).decode()
    with pytest.raises(BadRequest, match="malformed"):
        payload.events()
    payload.xml.text = "not base64!"
    with pytest.raises(BadRequest):
        payload.events()


def test_put_value_property() -> None:
    put = wire.Put()
    put.value = b"\x00\xff binary"
    assert wire.Put(xml=reparse(put.xml)).value == b"\x00\xff binary"
    put.value = b""
    assert put.xml.text is None
    assert put.value == b""


@pytest.mark.parametrize("options", [
    {},
    {"if_version": 0},
    {"if_version": 3, "if_mod_rev": 17},
    {"ephemeral": True},
    {"lease": "l-1&'<x>"},
])
@pytest.mark.parametrize("value", [b"", b"\x00\xff binary", b"<&'\">" * 50])
def test_put_text_says_what_the_put_element_says(options: dict, value: bytes) -> None:
    key = "/a b/k&'<\"x\">/\u00e9"
    element = wire.Put()
    element.set_attrs(key=key, **options)
    element.value = value
    parsed = reparse_text(wire.put_text(key, value, **options))
    assert parsed.tag == element.xml.tag
    assert parsed.attrib == element.xml.attrib
    assert wire.Put(xml=parsed).value == value


def test_shard_list_round_trip() -> None:
    status = wire.Status()
    status.add_shard("/", rev=10, compact_rev=2, keys=5)
    status.add_shard("/a")
    assert wire.Status(xml=reparse(status.xml)).shards() == [
        {"prefix": "/", "rev": "10", "compact-rev": "2", "keys": "5"},
        {"prefix": "/a"},
    ]


# --- errors ---------------------------------------------------------------------


def error_element(error: KvError) -> ET.Element:
    """The ``<error/>`` a storage node sends for ``error``, as it arrives on the wire."""
    text = xmltext.serialize(xmpp.error_element(error), "jabber:client")
    element = ET.fromstring(f"<iq xmlns='jabber:client'>{text}</iq>").find(
        "{jabber:client}error")
    assert element is not None
    return element


def bare_error_element(condition: str, text: str = "") -> ET.Element:
    """An ``<error/>`` as the XMPP server builds it: no kvstore condition."""
    element = ET.Element("{jabber:client}error", {"type": "cancel"})
    ET.SubElement(element, f"{{{wire.STANZAS_NS}}}{condition}")
    if text:
        ET.SubElement(element, f"{{{wire.STANZAS_NS}}}text").text = text
    return reparse(element)


@pytest.mark.parametrize("cls", list(errors.CONDITIONS.values()),
                         ids=list(errors.CONDITIONS))
def test_every_condition_round_trips_with_its_details(cls: type[KvError]) -> None:
    error = cls(f"it went wrong: {cls.__name__} <&>", key="/a/b", number=17, absent=None)
    parsed = wire.parse_error(error_element(error))
    assert type(parsed) is cls
    assert str(parsed) == str(error)
    assert parsed.details == {"key": "/a/b", "number": "17"}


def _xmpp_condition(element: ET.Element) -> str | None:
    for child in element:
        namespace, _, name = child.tag[1:].partition("}")
        if namespace == wire.STANZAS_NS and name != "text":
            return name
    return None


@pytest.mark.parametrize("cls", list(errors.CONDITIONS.values()), ids=list(errors.CONDITIONS))
def test_the_xmpp_condition_on_the_wire_is_the_declared_one(cls: type[KvError]) -> None:
    element = error_element(cls("x"))
    assert element.get("type") == cls.xmpp_type
    assert _xmpp_condition(element) == cls.xmpp_condition


def test_typed_details_survive_the_round_trip() -> None:
    mismatch = wire.parse_error(error_element(
        VersionMismatch("no", **{"current-version": 3, "current-mod-rev": 99})))
    assert isinstance(mismatch, VersionMismatch)
    assert (mismatch.current_version, mismatch.current_mod_rev) == (3, 99)

    compacted = wire.parse_error(error_element(Compacted("gone", **{"compact-rev": 12})))
    assert isinstance(compacted, Compacted)
    assert compacted.compact_rev == 12

    not_owner = wire.parse_error(error_element(NotOwner("elsewhere", shard="/s")))
    assert isinstance(not_owner, NotOwner)
    assert not_owner.shard == "/s"
    assert NotOwner("x").shard is None


def test_error_classes_have_distinct_conditions_and_valid_xmpp_types() -> None:
    assert len(errors.CONDITIONS) == len(set(errors.CONDITIONS))
    for name, cls in errors.CONDITIONS.items():
        assert cls.condition == name
        assert cls.xmpp_type in ("auth", "cancel", "continue", "modify", "wait")


@pytest.mark.parametrize(("condition", "cls"), [
    ("service-unavailable", Unavailable),
    ("recipient-unavailable", Unavailable),
    ("remote-server-not-found", Unavailable),
    ("remote-server-timeout", Timeout),
    ("item-not-found", Unavailable),
    ("forbidden", Forbidden),
    ("not-authorized", Forbidden),
    ("bad-request", BadRequest),
    ("feature-not-implemented", BadRequest),
    ("policy-violation", ValueTooLarge),
    ("resource-constraint", ResourceLimit),
    ("internal-server-error", KvError),
    ("undefined-condition", KvError),
])
def test_bare_xmpp_conditions_map_to_kvstore_errors(condition: str, cls: type[KvError]) -> None:
    parsed = wire.parse_error(bare_error_element(condition, "server says no"))
    assert type(parsed) is cls
    assert str(parsed) == "server says no"
    # Without a text, the condition itself is the message.
    assert str(wire.parse_error(bare_error_element(condition))) == condition


def test_kvstore_condition_wins_over_the_xmpp_one() -> None:
    # KeyNotFound travels as item-not-found, which bare would mean Unavailable.
    parsed = wire.parse_error(error_element(errors.KeyNotFound("/a not found", key="/a")))
    assert type(parsed) is errors.KeyNotFound


def test_parse_error_without_an_element() -> None:
    parsed = wire.parse_error(None)
    assert type(parsed) is KvError


def test_timeout_is_an_unavailable() -> None:
    assert isinstance(Timeout("t"), Unavailable)
    assert Timeout("t").xmpp_type == "wait"
