"""The ceiling: a raw IQ echo between two plain slixmpp clients.

The responder answers every IQ get carrying ``<echo xmlns='urn:x-kvstore:bench-echo'/>``
with an empty result. Two more shapes carry what the store's requests carry,
without the store's work, to tell the cost of routing the value's bytes
apart from the cost of the store:

* ``answer-bytes='N'``: answered with an ``<item/>`` made like a storage
  node's answer to a single get of an N-byte value (``echo-item``);
* a request whose text is a base64 value, as a put's is: answered like a
  put, with the new revision, version and create-rev (``echo-put``).

The responder runs in a process of its own (``python -m bench.echo``), as a
storage node does, so the echo and the store cross the same boundaries:
bench process -> Prosody -> serving process and back.

Both ends use the technique of :class:`kvstore.xmpp.Session`'s fast lane, so
the echo stays the best the transport allows the store: incoming echo IQs
and their answers are taken off the stream as raw XML before slixmpp wraps
them in stanza objects and runs its handler matching, and both requests and
answers are sent as text (``send_raw``). Answers are matched to requests
through one table of futures keyed by stanza id, never with slixmpp's
``await iq.send()``, which registers a handler per pending IQ.

Both log in with the plaintext settings the store's sessions use on loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slixmpp import ClientXMPP
from slixmpp.xmlstream import ET

from bench.child import ChildProcess, child_main
from kvstore.config import ConnectionSettings
from protocol.model import KeyValue
from protocol.stanza import NS as KV_NS
from protocol.stanza import encode_value, item_text
from protocol.xmltext import escape_attribute

NS = "urn:x-kvstore:bench-echo"
ECHO_TAG = f"{{{NS}}}echo"
IQ_TAG = "{jabber:client}iq"
RESPONDER_RESOURCE = "echo"


class EchoError(Exception):
    """The echo could not log in, or a request failed or timed out."""


class FastClient(ClientXMPP):
    """slixmpp's client with a hook in front of its dispatcher (the store's fast lane)."""

    take: Callable[[ET.Element], bool] | None = None
    """Called with every incoming stanza's XML; True means it was handled here."""

    def _spawn_event(self, xml: ET.Element) -> None:
        if self.take is None or not self.take(xml):
            super()._spawn_event(xml)


def plain_client(settings: ConnectionSettings, resource: str) -> FastClient:
    """A bare slixmpp client with the plaintext loopback settings of kvstore.xmpp.Session."""
    xmpp = FastClient(
        f"{settings.jid}/{resource}",
        settings.password,
        plugin_config={"feature_mechanisms": {"unencrypted_scram": True}},
    )
    xmpp.enable_plaintext = True
    xmpp.enable_starttls = False
    xmpp.enable_direct_tls = False
    return xmpp


def item_answer(value_bytes: int) -> str:
    """An ``<item/>`` like a node's answer to a get of a ``value_bytes`` value."""
    record = KeyValue("/bench/get/k000000", bytes(value_bytes), version=1,
                      create_rev=5_000, mod_rev=5_000)
    return item_text(record, rev=123_456)


PUT_ANSWER = f"<put xmlns='{KV_NS}' rev='123456' version='2' create-rev='5000'/>"
"""Shaped like a storage node's answer to a put."""


async def login(xmpp: ClientXMPP, host: str, port: int, timeout: float = 10.0) -> None:
    """Connect and wait for ``session_start``; raise EchoError if that fails in time."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()

    def settle(error: str | None) -> None:
        if not started.done():
            if error is None:
                started.set_result(None)
            else:
                started.set_exception(EchoError(error))

    xmpp.add_event_handler("session_start", lambda _: settle(None))
    xmpp.add_event_handler("failed_all_auth",
                           lambda _: settle(f"login refused for {xmpp.boundjid}"))
    xmpp.add_event_handler("connection_failed",
                           lambda error: settle(f"cannot reach {host}:{port}: {error}"))
    xmpp.connect(host, port)
    try:
        await asyncio.wait_for(started, timeout)
    except TimeoutError:
        xmpp.cancel_connection_attempt()
        xmpp.abort()
        raise EchoError(f"no XMPP session with {host}:{port} within {timeout:g}s") from None


async def logout(xmpp: ClientXMPP) -> None:
    if xmpp.transport is None:
        return
    try:
        await asyncio.wait_for(xmpp.disconnect(wait=1.0), 2.0)
    except Exception:
        xmpp.abort()


# --- the responder ------------------------------------------------------------


class EchoResponder:
    """Answers every echo IQ get with an empty result, as raw text."""

    def __init__(self, settings: ConnectionSettings, resource: str = RESPONDER_RESOURCE) -> None:
        self.settings = settings
        self.xmpp = plain_client(settings, resource)
        self.xmpp.take = self._take
        self._items: dict[str, str] = {}

    @property
    def jid(self) -> str:
        return str(self.xmpp.boundjid)

    async def start(self) -> None:
        await login(self.xmpp, self.settings.host, self.settings.port)

    async def stop(self) -> None:
        await logout(self.xmpp)

    def _take(self, xml: ET.Element) -> bool:
        if xml.tag != IQ_TAG or xml.get("type") != "get":
            return False
        for child in xml:
            if child.tag != ECHO_TAG:
                return False
            if self.xmpp.transport is None:
                return True
            sender = xml.get("from")
            recipient = f" to='{escape_attribute(sender)}'" if sender else ""
            size = child.get("answer-bytes")
            payload = self._item(size) if size else PUT_ANSWER if child.text else ""
            self.xmpp.send_raw(
                f"<iq type='result' id='{escape_attribute(xml.get('id', ''))}'{recipient}>"
                f"{payload}</iq>")
            return True
        return False

    def _item(self, size: str) -> str:
        answer = self._items.get(size)
        if answer is None:
            if not size.isdigit() or int(size) > 1_000_000:
                return ""
            answer = self._items[size] = item_answer(int(size))
        return answer


# --- the requester ------------------------------------------------------------


class EchoRequester:
    """Sends echo IQs to ``target`` as text; one table of futures keyed by id."""

    def __init__(self, settings: ConnectionSettings, target: str, *, resource: str = "bench",
                 timeout: float = 5.0) -> None:
        self.settings = settings
        self.target = target
        self.timeout = timeout
        self.xmpp = plain_client(settings, resource)
        self.xmpp.take = self._take
        self._pending: dict[str, tuple[asyncio.Future[None], asyncio.TimerHandle]] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)
        self._to = escape_attribute(target)

    async def start(self) -> None:
        await login(self.xmpp, self.settings.host, self.settings.port)

    async def stop(self) -> None:
        for future, timer in self._pending.values():
            timer.cancel()
            if not future.done():
                future.cancel()
        self._pending.clear()
        await logout(self.xmpp)

    def request(self, answer_bytes: int = 0, carry: bytes = b"") -> asyncio.Future[None]:
        """Send one echo IQ now; the future resolves with its answer (or fails).

        With ``answer_bytes`` the responder answers with an item like a get's
        answer for a value of that size instead of an empty result; ``carry``
        goes in the request as a put's value does, and is answered like a put.
        """
        iq_id = f"{self._prefix}-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self.xmpp.transport is None:
            future.set_exception(EchoError("not connected"))
            return future
        # Settled by the answer or the timer, without a done-callback, as
        # kvstore.xmpp.Session does.
        timer = loop.call_later(self.timeout, self._expire, iq_id)
        self._pending[iq_id] = (future, timer)
        shape = f" answer-bytes='{answer_bytes}'" if answer_bytes else ""
        body = f">{encode_value(carry)}</echo>" if carry else "/>"
        self.xmpp.send_raw(f"<iq type='get' id='{iq_id}' to='{self._to}'>"
                           f"<echo xmlns='{NS}' seq='{iq_id}'{shape}{body}</iq>")
        return future

    def _expire(self, iq_id: str) -> None:
        entry = self._pending.pop(iq_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(EchoError(f"no echo answer within {self.timeout:g}s"))

    def _take(self, xml: ET.Element) -> bool:
        """IQ results and errors whose id is pending: one dict lookup per stanza."""
        if xml.tag != IQ_TAG:
            return False
        kind = xml.get("type")
        if kind != "result" and kind != "error":
            return False
        entry = self._pending.pop(xml.get("id", ""), None)
        if entry is None:
            return False
        future, timer = entry
        timer.cancel()
        if not future.done():
            if kind == "result":
                future.set_result(None)
            else:
                future.set_exception(EchoError(f"echo answered with an error: {xml.get('id')}"))
        return True


# --- the responder's process --------------------------------------------------


class ResponderProcess:
    """Runs an :class:`EchoResponder` in a child process (``python -m bench.echo``).

    The child reads its settings from its stdin and exits when stdin closes,
    so it also goes away if this process dies without cleaning up.
    """

    def __init__(self, settings: ConnectionSettings, log_path: Path) -> None:
        self.settings = settings
        self.child = ChildProcess("bench.echo", log_path, EchoError)
        self.jid = ""

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def start(self, timeout: float = 20.0) -> str:
        """Start the child and return the full JID it answers at."""
        self.child.start()
        try:
            self.child.send({"jid": self.settings.jid, "password": self.settings.password,
                             "host": self.settings.host, "port": self.settings.port})
            self.jid = self.child.read("ready: ", timeout)
        except EchoError:
            self.stop()
            raise
        return self.jid

    def stop(self, timeout: float = 3.0) -> None:
        self.child.close(timeout)  # closing stdin asks the child to log out and exit


async def _serve(config: dict[str, Any]) -> None:
    settings = ConnectionSettings(jid=config["jid"], password=config["password"],
                                  host=config["host"], port=int(config["port"]), plaintext=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def wait_for_eof() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, name="stdin-eof", daemon=True).start()
    responder = EchoResponder(settings)
    await responder.start()
    print(f"ready: {responder.jid}", flush=True)
    try:
        await stop.wait()
    finally:
        await responder.stop()


def main() -> int:
    """Entry point of the responder's process: settings as one JSON line on stdin."""
    return child_main("echo responder", lambda config: asyncio.run(_serve(config)))


if __name__ == "__main__":
    sys.exit(main())
