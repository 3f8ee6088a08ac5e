"""Malformed kvstore requests, sent by a raw XMPP client straight to a storage node.

No kvstore client code is involved on the sending side: the payloads are
written by hand, so the node sees exactly what a buggy or hostile client
would send. Each must be answered with an IQ error carrying the right XMPP
condition and the right kvstore condition; afterwards the node must still
serve normal requests and the store must hold nothing from the bad ones.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

import pytest
import pytest_asyncio
from slixmpp import ClientXMPP, Iq
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatcherId

from kvstore.client import Client
from kvstore.devcluster import DevCluster
from protocol.errors import KeyNotFound
from protocol.stanza import NS

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
CLIENT = "jabber:client"
NODE_VALUE_LIMIT = 128 * 1024


@pytest_asyncio.fixture(autouse=True)
async def _collect_sessions() -> AsyncIterator[None]:
    """Collect the test's closed XMPP sessions while their event loop is still open."""
    yield
    gc.collect()
    await asyncio.sleep(0)


@pytest_asyncio.fixture
async def raw(cluster: DevCluster) -> AsyncIterator[ClientXMPP]:
    """A bare slixmpp client on a fresh account, connected the way Session connects."""
    settings = cluster.settings(f"raw-{uuid.uuid4().hex[:8]}")
    xmpp = ClientXMPP(f"{settings.jid}/raw", settings.password,
                      plugin_config={"feature_mechanisms": {"unencrypted_scram": True}})
    xmpp.enable_plaintext = True
    xmpp.enable_starttls = False
    xmpp.enable_direct_tls = False
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_start(_: object) -> None:
        if not started.done():
            started.set_result(None)

    def on_failure(reason: object) -> None:
        if not started.done():
            started.set_exception(RuntimeError(f"raw client could not log in: {reason}"))

    xmpp.add_event_handler("session_start", on_start)
    xmpp.add_event_handler("failed_all_auth", on_failure)
    xmpp.add_event_handler("connection_failed", on_failure)
    xmpp.connect(settings.host, settings.port)
    try:
        await asyncio.wait_for(started, 10)
        yield xmpp
    finally:
        try:
            await asyncio.wait_for(xmpp.disconnect(wait=1.0), 3)
        except Exception:
            xmpp.abort()


@dataclass
class ErrorReply:
    type: str
    xmpp_condition: str | None
    kv_condition: str | None
    kv_attrs: dict[str, str]
    text: str


async def send(xmpp: ClientXMPP, to: str, iq_type: str, payload: str | None) -> Iq:
    """Send an IQ with a hand-written payload; return the answer, result or error.

    The answer is caught by id with a plain handler rather than through
    ``Iq.send``: slixmpp turns an error answer into an ``IqError`` only when it
    knows the condition, and its list predates RFC 6120 (no policy-violation).
    """
    iq = xmpp.Iq()
    iq["type"] = iq_type
    iq["to"] = to
    if payload is not None:
        iq.xml.append(ET.fromstring(payload))
    answer: asyncio.Future[Iq] = asyncio.get_running_loop().create_future()

    def on_answer(stanza: Iq) -> None:
        if stanza.xml.get("type") in ("result", "error") and not answer.done():
            answer.set_result(stanza)

    name = f"answer-{iq['id']}"
    xmpp.register_handler(Callback(name, MatcherId(iq["id"]), on_answer))
    try:
        xmpp.send(iq)
        return await asyncio.wait_for(answer, 10)
    finally:
        xmpp.remove_handler(name)


def parse_error(reply: Iq) -> ErrorReply:
    assert reply.xml.get("type") == "error", ET.tostring(reply.xml)
    error = reply.xml.find(f"{{{CLIENT}}}error")
    assert error is not None, ET.tostring(reply.xml)
    xmpp_condition = kv_condition = None
    kv_attrs: dict[str, str] = {}
    text = ""
    for child in error:
        namespace, _, name = child.tag[1:].partition("}")
        if namespace == STANZAS:
            if name == "text":
                text = child.text or ""
            else:
                xmpp_condition = name
        elif namespace == NS:
            kv_condition = name
            kv_attrs = dict(child.attrib)
    return ErrorReply(error.get("type", ""), xmpp_condition, kv_condition, kv_attrs, text)


def el(tag: str, attrs: dict[str, str] | None = None, text: str = "") -> str:
    """A payload element in the kvstore namespace."""
    rendered = "".join(f" {name}={quoteattr(value)}" for name, value in (attrs or {}).items())
    return f"<{tag} xmlns='{NS}'{rendered}>{text}</{tag}>"


@dataclass
class Case:
    iq_type: str
    payload: str
    xmpp_condition: str
    kv_condition: str
    error_type: str = "modify"


def cases(prefix: str) -> dict[str, Case]:
    key = f"{prefix}/k"
    long_key = prefix + "/" + "k" * (501 - len(prefix) - 1)
    over = base64.b64encode(os.urandom(NODE_VALUE_LIMIT + 1)).decode()
    far_over = base64.b64encode(os.urandom(180_000)).decode()
    bad, invalid = ("bad-request", "bad-request"), ("bad-request", "invalid-key")
    table: dict[str, tuple[str, str, tuple[str, str]]] = {
        "get-without-key": ("get", el("get"), bad),
        "get-prefix-without-key": ("get", el("get", {"prefix": "true"}), bad),
        "put-without-key": ("set", el("put", text="dg=="), bad),
        "put-non-numeric-if-version": (
            "set", el("put", {"key": key, "if-version": "abc"}, "dg=="), bad),
        "put-float-if-version": ("set", el("put", {"key": key, "if-version": "1.5"}, "dg=="), bad),
        "put-negative-if-version": (
            "set", el("put", {"key": key, "if-version": "-1"}, "dg=="), bad),
        "put-huge-if-version": (
            "set", el("put", {"key": key, "if-version": "1" * 25}, "dg=="), bad),
        "put-non-ascii-digit-if-version": (
            "set", el("put", {"key": key, "if-version": "\u0661"}, "dg=="), bad),
        "put-non-numeric-if-mod-rev": (
            "set", el("put", {"key": key, "if-mod-rev": "latest"}, "dg=="), bad),
        "put-invalid-base64": ("set", el("put", {"key": key}, "!!not base64!!"), bad),
        "put-base64-bad-padding": ("set", el("put", {"key": key}, "dGVzdA="), bad),
        "put-bad-ephemeral-flag": (
            "set", el("put", {"key": key, "ephemeral": "sometimes"}, "dg=="), bad),
        "put-in-iq-get": ("get", el("put", {"key": key}, "dg=="), bad),
        "delete-in-iq-get": ("get", el("delete", {"key": key}), bad),
        "get-in-iq-set": ("set", el("get", {"key": key}), bad),
        "unknown-element": ("get", el("frobnicate", {"key": key}), bad),
        "unknown-element-set": ("set", el("frobnicate", {"key": key}, "dg=="), bad),
        "get-key-with-dotdot": ("get", el("get", {"key": f"{prefix}/../escape"}), invalid),
        "put-key-with-dotdot": ("set", el("put", {"key": f"{prefix}/a/../k"}, "dg=="), invalid),
        "put-key-with-dot": ("set", el("put", {"key": f"{prefix}/./k"}, "dg=="), invalid),
        "put-relative-key": ("set", el("put", {"key": "relative/k"}, "dg=="), invalid),
        "put-empty-key": ("set", el("put", {"key": ""}, "dg=="), invalid),
        "put-root-key": ("set", el("put", {"key": "/"}, "dg=="), invalid),
        "put-key-over-node-limit": ("set", el("put", {"key": long_key}, "dg=="), invalid),
        "put-empty-segment": ("set", el("put", {"key": f"{prefix}//k"}, "dg=="), invalid),
        "delete-key-with-dotdot": ("set", el("delete", {"key": f"{prefix}/.."}), invalid),
        "get-prefix-bad-after": (
            "get", el("get", {"key": prefix, "prefix": "true", "after": "no/slash/../"}),
            invalid),
        "oversize-value": (
            "set", el("put", {"key": key}, over), ("policy-violation", "too-large")),
        "far-oversize-value": (
            "set", el("put", {"key": key}, far_over), ("policy-violation", "too-large")),
        "get-limit-zero": ("get", el("get", {"key": prefix, "prefix": "true", "limit": "0"}), bad),
        "get-limit-negative": (
            "get", el("get", {"key": prefix, "prefix": "true", "limit": "-5"}), bad),
        "list-limit-zero": ("get", el("list", {"key": prefix, "limit": "0"}), bad),
        "list-limit-negative": ("get", el("list", {"key": prefix, "limit": "-5"}), bad),
        "list-after-with-slash": ("get", el("list", {"key": prefix, "after": "a/b"}), bad),
        "get-bad-prefix-flag": ("get", el("get", {"key": key, "prefix": "maybe"}), bad),
        "delete-prefix-with-compare": (
            "set", el("delete", {"key": prefix, "prefix": "true", "if-version": "1"}), bad),
        "watch-without-id": ("set", el("watch", {"key": key}), bad),
        "watch-bad-start-rev": (
            "set", el("watch", {"key": key, "id": "w1", "start-rev": "soon"}), bad),
    }
    return {
        name: Case(iq_type, payload, xmpp_condition, kv_condition)
        for name, (iq_type, payload, (xmpp_condition, kv_condition)) in table.items()
    }


CASE_NAMES = list(cases("/t/x"))


async def revisions(client: Client) -> dict[str, int]:
    return {shard.prefix: shard.rev for node in await client.status() for shard in node.shards}


async def assert_node_serves(raw: ClientXMPP, node: str, kv_client: Client, prefix: str) -> None:
    """The node still answers well-formed requests, errors and results alike."""
    missing = await send(raw, node, "get", el("get", {"key": f"{prefix}/absent"}))
    error = parse_error(missing)
    assert (error.xmpp_condition, error.kv_condition) == ("item-not-found", "key-not-found")
    status = await send(raw, node, "get", el("status"))
    assert status.xml.get("type") == "result"
    assert status.xml.find(f"{{{NS}}}status") is not None


async def assert_nothing_stored(kv_client: Client, prefix: str, before: dict[str, int]) -> None:
    assert await revisions(kv_client) == before
    assert (await kv_client.get_prefix(prefix)).items == []
    with pytest.raises(KeyNotFound):
        await kv_client.get(f"{prefix}/k")
    written = await kv_client.put(f"{prefix}/fine", b"ok")
    assert written.rev == before["/"] + 1
    assert (await kv_client.get(f"{prefix}/fine")).value == b"ok"


@pytest.mark.parametrize("name", CASE_NAMES)
async def test_malformed_request_gets_an_error(raw: ClientXMPP, kv: Client, cluster: DevCluster,
                                               prefix: str, name: str) -> None:
    node = cluster.nodes["node1"].jid
    case = cases(prefix)[name]
    before = await revisions(kv)
    reply = await send(raw, node, case.iq_type, case.payload)
    assert reply["from"] == node
    error = parse_error(reply)
    assert error.xmpp_condition == case.xmpp_condition, error
    assert error.kv_condition == case.kv_condition, error
    assert error.type == case.error_type, error
    assert error.text, error
    if case.kv_condition == "too-large":
        assert error.kv_attrs.get("limit") == str(NODE_VALUE_LIMIT)
    await assert_node_serves(raw, node, kv, prefix)
    await assert_nothing_stored(kv, prefix, before)


async def test_burst_of_malformed_requests(raw: ClientXMPP, kv: Client, cluster: DevCluster,
                                           prefix: str) -> None:
    """All of them at once, interleaved with good writes: each gets its own answer.

    (The good writes come from the ``kv`` client: the raw client's fresh
    account may read but, under the cluster's access rules, not write.)
    """
    node = cluster.nodes["node1"].jid
    table = cases(prefix)
    before = await revisions(kv)
    good = [asyncio.ensure_future(kv.put(f"{prefix}/good/{i}", b"g")) for i in range(5)]
    replies = await asyncio.gather(
        *(send(raw, node, case.iq_type, case.payload) for case in table.values()))
    await asyncio.gather(*good)
    for (name, case), reply in zip(table.items(), replies, strict=True):
        error = parse_error(reply)
        assert (error.xmpp_condition, error.kv_condition) == (
            case.xmpp_condition, case.kv_condition), name
    after = await revisions(kv)
    assert after["/"] == before["/"] + 5
    found = await kv.get_prefix(prefix)
    assert [item.key for item in found.items] == [f"{prefix}/good/{i}" for i in range(5)]
    await assert_node_serves(raw, node, kv, prefix)


@pytest.mark.parametrize("iq_type", ["get", "set"])
async def test_unknown_namespace_payload(raw: ClientXMPP, kv: Client, cluster: DevCluster,
                                         prefix: str, iq_type: str) -> None:
    node = cluster.nodes["node1"].jid
    before = await revisions(kv)
    reply = await send(raw, node, iq_type,
                       f"<get xmlns='urn:example:not-kvstore' key='{prefix}/k'/>")
    error = parse_error(reply)
    assert error.xmpp_condition in ("feature-not-implemented", "service-unavailable"), error
    assert error.kv_condition is None
    await assert_node_serves(raw, node, kv, prefix)
    await assert_nothing_stored(kv, prefix, before)


async def test_iq_without_payload(raw: ClientXMPP, kv: Client, cluster: DevCluster,
                                  prefix: str) -> None:
    node = cluster.nodes["node1"].jid
    reply = await send(raw, node, "get", None)
    error = parse_error(reply)
    assert error.xmpp_condition in ("feature-not-implemented", "service-unavailable",
                                    "bad-request"), error
    await assert_node_serves(raw, node, kv, prefix)


async def test_oversize_value_to_second_shard(raw: ClientXMPP, kv: Client, cluster: DevCluster,
                                              prefix: str) -> None:
    node = cluster.nodes["node2"].jid
    key = f"/sharded/raw-{uuid.uuid4().hex[:8]}"
    before = await revisions(kv)
    value = base64.b64encode(os.urandom(NODE_VALUE_LIMIT + 1)).decode()
    error = parse_error(await send(raw, node, "set", el("put", {"key": key}, value)))
    assert (error.xmpp_condition, error.kv_condition) == ("policy-violation", "too-large")
    assert await revisions(kv) == before
    with pytest.raises(KeyNotFound):
        await kv.get(key)
    await assert_node_serves(raw, node, kv, key)
    exact = os.urandom(NODE_VALUE_LIMIT)
    await kv.put(key, exact)
    assert (await kv.get(key)).value == exact
