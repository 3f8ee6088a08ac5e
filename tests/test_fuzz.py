"""Fuzz: 10,000 well-formed stanzas with malformed kvstore payloads, all answered.

Each example is a burst of 50 IQs sent at once to a storage node by a JID
that may read but not write (so a payload that happens to be valid changes
nothing either), plus writes from the admin whose keys are always invalid.
Every IQ must be answered (a result or an error), the node must keep
serving, and the store must be exactly as it was.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slixmpp.xmlstream import ET

from kvstore.client import Client
from kvstore.config import ConnectionSettings
from kvstore.devcluster import DevCluster
from protocol import keys
from protocol.errors import KvError, Unavailable
from protocol.stanza import NS

xml_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn")), max_size=40)
numbers = st.one_of(st.integers(-10**30, 10**30).map(str), st.sampled_from(
    ["", "-0", "1e3", "0x10", " 7", "٣", "9" * 40, "NaN", "--5"]))
key_like = st.one_of(
    xml_text,
    st.lists(xml_text, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["/", "//", "/a/../b", "/a/./b", "a/b", "/a/", "/" + "x" * 600,
                     "/" + "/".join("d" * 40), "/sharded/x", "/fuzz/ok"]),
)
attribute_values = st.one_of(xml_text, numbers, key_like, st.sampled_from(["true", "false"]))
attributes = st.dictionaries(
    st.sampled_from(["key", "prefix", "limit", "after", "if-version", "if-mod-rev", "shard",
                     "id", "start-rev", "keys-only", "ephemeral", "prev-kv", "progress",
                     "watch", "rev", "bogus"]),
    attribute_values, max_size=6)
texts = st.one_of(st.none(), xml_text, st.binary(max_size=300).map(
    lambda b: base64.b64encode(b).decode()), st.sampled_from(["!!!", "====", "A" * 200_000]))
names = st.sampled_from(["get", "put", "delete", "list", "status", "watch", "cancel", "events",
                         "txn", "bogus", "GET", "item"])
# Children carry small texts only: the whole stanza stays under the server's
# 256 KiB limit (past it, the server, not the node, ends the stream).
small_texts = st.one_of(st.none(), xml_text, st.sampled_from(["!!!", "AAAA", "=="]))
children = st.lists(st.tuples(st.sampled_from(["item", "child", "value", "x"]), attributes,
                              small_texts), max_size=3)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[str, ET.Element]:
    element = ET.Element(f"{{{NS}}}{draw(names)}", draw(attributes))
    element.text = draw(texts)
    for tag, attrs, text in draw(children):
        child = ET.SubElement(element, f"{{{NS}}}{tag}", attrs)
        child.text = text
    return draw(st.sampled_from(["get", "set"])), element


@st.composite
def invalid_writes(draw: st.DrawFn) -> tuple[str, ET.Element]:
    key = draw(key_like.filter(lambda k: not keys.is_valid(k, allow_root=False)))
    element = ET.Element(f"{{{NS}}}{draw(st.sampled_from(['put', 'delete']))}", {"key": key})
    element.text = draw(texts)
    return "set", element


async def _burst(client: Client, target: str, stanzas: list[tuple[str, ET.Element]]) -> None:
    futures = [client.session.send_iq(client.session.iq(target, type_, payload), 30)
               for type_, payload in stanzas]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    for outcome in outcomes:
        # Every IQ gets the node's own answer: a result, or an error it sent.
        # Unavailable (a lost connection) or Timeout would mean no answer.
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, KvError), repr(outcome)
            assert not isinstance(outcome, Unavailable), repr(outcome)


async def _fingerprint(kv: Client) -> list[tuple[str, int, int]]:
    return [(s.prefix, s.rev, s.keys) for node in await kv.status() for s in node.shards]


class Fuzzer:
    """Two connected clients on a loop of their own, shared by every example."""

    def __init__(self, cluster: DevCluster) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.admin = self.run(self._connect(cluster.settings()))
        self.reader = self.run(self._connect(cluster.settings("fuzzer")))
        self.node = cluster.nodes["node1"].jid
        self.sent = 0
        self.before = self.run(_fingerprint(self.admin))

    @staticmethod
    async def _connect(settings: ConnectionSettings) -> Client:
        client = Client(settings)
        await client.connect()
        return client

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)

    def close(self) -> None:
        self.run(self.admin.close())
        self.run(self.reader.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def fuzzer(cluster: DevCluster) -> Iterator[Fuzzer]:
    fuzz = Fuzzer(cluster)
    yield fuzz
    fuzz.close()


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(random=st.lists(payloads(), min_size=45, max_size=45),
       writes=st.lists(invalid_writes(), min_size=5, max_size=5))
def test_malformed_stanzas_are_all_answered_and_change_nothing(
        fuzzer: Fuzzer, random: list[tuple[str, ET.Element]],
        writes: list[tuple[str, ET.Element]]) -> None:
    async def both() -> None:
        await asyncio.gather(_burst(fuzzer.reader, fuzzer.node, random),
                             _burst(fuzzer.admin, fuzzer.node, writes))

    fuzzer.run(both())
    fuzzer.sent += len(random) + len(writes)


def test_after_ten_thousand_the_store_is_unchanged_and_serving(
        fuzzer: Fuzzer, cluster: DevCluster) -> None:
    # Runs after the examples above (pytest keeps file order).
    assert fuzzer.sent >= 10_000
    assert fuzzer.run(_fingerprint(fuzzer.admin)) == fuzzer.before
    fuzzer.run(fuzzer.admin.get_prefix("/", limit=1))
    assert all(node.process is not None and node.process.poll() is None
               for node in cluster.nodes.values())
