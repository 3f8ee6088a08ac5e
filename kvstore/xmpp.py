"""One XMPP session: connect, log in, send requests and match their answers.

Storage nodes, clients and agents each hold one :class:`Session`. It wraps a
slixmpp ``ClientXMPP`` and adds what slixmpp leaves to the application:

* requests with one handler for every answer and a table of futures keyed by
  stanza id (slixmpp's ``Iq.send`` registers a handler per pending request
  and matches every stanza against all of them, which collapses under load);
* a timeout on every wait, reported as :class:`~protocol.errors.Timeout`;
* a clear error when the server is down or refuses the credentials;
* reconnection with a short, capped back-off, and hooks that run after every
  (re)connection so the roles above can restore their state;
* a fast lane: the IQs the store exchanges (requests, answers, pushes, pings)
  are taken off the stream as raw XML before slixmpp wraps them in stanza
  objects and matches them against every registered handler, and they are
  sent as text built with ``str.replace`` escaping. Both cost more than the
  rest of a request put together. Everything else (login, roster, presence,
  disco) goes through slixmpp as usual.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from slixmpp import JID, ClientXMPP, Iq, Presence
from slixmpp.exceptions import IqError
from slixmpp.util import bytes as utf8
from slixmpp.util.sasl.mechanisms import SCRAM
from slixmpp.xmlstream import ET, register_stanza_plugin

from kvstore.config import ConnectionSettings
from protocol import agent as agent_wire
from protocol import stanza as wire
from protocol import xmltext
from protocol.errors import KvError, Timeout, Unavailable

log = logging.getLogger(__name__)

CLIENT_NS = "jabber:client"
IQ_TAG = f"{{{CLIENT_NS}}}iq"
ERROR_TAG = f"{{{CLIENT_NS}}}error"
_PING_TAG = "{urn:xmpp:ping}ping"

Hook = Callable[[], Awaitable[None] | None]

SCRAM_MECHANISMS = {"SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"}


class AuthenticationFailed(Unavailable):
    """The XMPP server refused the configured JID and password."""

    condition = "not-authorized"


def _scram_hi(mechanism: SCRAM, text: str | bytes, salt: bytes, iterations: int) -> bytes:
    """SCRAM's Hi (RFC 5802), which is PBKDF2 with the mechanism's hash.

    slixmpp computes it with one Python HMAC per iteration: about 9 ms a login
    at Prosody's 4,096 iterations, against 1 ms in C. Every ``kv`` command
    logs in once, and a machine starting hundreds of sessions at once spent
    most of its CPU here.
    """
    return hashlib.pbkdf2_hmac(mechanism.hash().name, utf8(text), salt, iterations)


SCRAM.Hi = _scram_hi


def register_stanzas() -> None:
    """Teach slixmpp the kvstore payloads (idempotent)."""
    for request in wire.REQUESTS:
        register_stanza_plugin(Iq, request)
    register_stanza_plugin(Iq, agent_wire.Call)
    register_stanza_plugin(Presence, wire.Shards)


class Inbound:
    """An IQ for one of the session's routes: its raw XML and its payload element."""

    __slots__ = ("payload", "xml")

    def __init__(self, xml: ET.Element, payload: ET.Element) -> None:
        self.xml = xml
        self.payload = payload

    @property
    def sender(self) -> str:
        return self.xml.get("from", "")

    @property
    def id(self) -> str:
        return self.xml.get("id", "")

    @property
    def type(self) -> str:
        return self.xml.get("type", "")


class OutboundIq:
    """An IQ request to send: recipient, type and payload (an element or its text)."""

    __slots__ = ("payload", "to", "type")

    def __init__(self, to: str, type_: str, payload: ET.Element | str | None) -> None:
        self.to = to
        self.type = type_
        self.payload = payload


Route = Callable[[Inbound], None]


def _payload_text(payload: ET.Element | str | None) -> str:
    if payload is None:
        return ""
    if isinstance(payload, str):
        return payload
    return xmltext.serialize(payload, CLIENT_NS)


def payload_of(answer: ET.Element) -> ET.Element:
    """The payload element of an IQ (an empty one if it has none)."""
    for child in answer:
        if child.tag != ERROR_TAG:
            return child
    return ET.Element("empty")


def error_element(error: KvError) -> ET.Element:
    """``<error/>``: the XMPP condition, a text, and the kvstore condition.

    Built by hand: slixmpp's Error stanza only accepts the conditions it knows
    and silently sends another one for the rest (policy-violation).
    """
    element = ET.Element(ERROR_TAG, {"type": error.xmpp_type})
    ET.SubElement(element, f"{{{wire.STANZAS_NS}}}{error.xmpp_condition}")
    text = ET.SubElement(element, f"{{{wire.STANZAS_NS}}}text")
    text.text = str(error)[:1000]
    element.append(wire.error_condition(error))
    return element


class _FastXMPP(ClientXMPP):
    """slixmpp's client with the session's fast lane in front of its dispatcher."""

    session: Session

    def _spawn_event(self, xml: ET.Element) -> None:
        if not self.session._dispatch(xml):
            super()._spawn_event(xml)


class Session:
    """One authenticated XMPP session, kept up until :meth:`close`."""

    def __init__(self, settings: ConnectionSettings, *, resource: str | None = None,
                 reconnect: bool = True, plugins: tuple[str, ...] = ()) -> None:
        self.settings = settings
        jid = JID(settings.jid)
        if not jid.resource:
            jid.resource = resource or f"kv-{secrets.token_hex(4)}"
        self.reconnect = reconnect
        self.xmpp = _FastXMPP(
            jid,
            settings.password,
            plugin_config={"feature_mechanisms": {
                # SCRAM only: the password never crosses the wire, even in TLS.
                "use_mechs": SCRAM_MECHANISMS,
                "unencrypted_scram": settings.plaintext,
            }},
        )
        self._configure_transport()
        for plugin in plugins:
            self.xmpp.register_plugin(plugin)
        register_stanzas()
        self.xmpp.auto_authorize = None  # subscription requests are the roles' decision
        self.xmpp.auto_subscribe = False

        self.xmpp.session = self
        self._pending: dict[str, tuple[asyncio.Future[ET.Element], str | None,
                                       asyncio.TimerHandle]] = {}
        """Requests sent and not yet settled: id -> (future, addressee, timeout timer)."""
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)
        self.routes: dict[str, Route] = {_PING_TAG: self._on_ping}
        """Payload tag -> handler, for IQ get/set taken off the fast lane."""
        self._held: list[str] | None = None
        self.xmpp.add_event_handler("session_start", self._on_session_start)
        self.xmpp.add_event_handler("connection_failed", self._on_connection_failed)
        self.xmpp.add_event_handler("failed_all_auth", self._on_auth_failed)
        self.xmpp.add_event_handler("ssl_invalid_chain", self._on_bad_certificate)
        self.xmpp.add_event_handler("disconnected", self._on_disconnected)

        self.online = asyncio.Event()
        self.on_start: list[Hook] = []
        """Run after every successful login, first connection included."""
        self.on_stop: list[Callable[[], None]] = []
        """Run when a session ends, before any reconnection."""
        self._attempt: asyncio.Future[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def jid(self) -> JID:
        return self.xmpp.boundjid

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _configure_transport(self) -> None:
        xmpp = self.xmpp
        if self.settings.plaintext:
            xmpp.enable_plaintext = True
            xmpp.enable_starttls = False
            xmpp.enable_direct_tls = False
            return
        xmpp.enable_plaintext = False
        xmpp.enable_starttls = True
        xmpp.enable_direct_tls = False
        context = ssl.create_default_context(cafile=self.settings.ca_file)
        xmpp.ssl_context = context

    # --- connecting -------------------------------------------------------

    async def start(self, timeout: float | None = None) -> None:
        """Connect and log in; raise :class:`Unavailable` if that fails in time."""
        self._closing = False
        await self._connect_once(timeout or self.settings.timeout)

    async def _connect_once(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._attempt = loop.create_future()
        self.xmpp.connect(self.settings.host, self.settings.port)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._attempt)
        except TimeoutError:
            self._abandon_attempt()
            raise Unavailable(
                f"no XMPP session with {self.address} within {timeout:g}s"
            ) from None
        except KvError:
            self._abandon_attempt()
            raise
        finally:
            self._attempt = None

    def _abandon_attempt(self) -> None:
        self.xmpp.cancel_connection_attempt()
        self.xmpp.abort()

    def _settle(self, error: KvError | None = None) -> None:
        attempt = self._attempt
        if attempt is None or attempt.done():
            return
        if error is None:
            attempt.set_result(None)
        else:
            attempt.set_exception(error)

    async def _on_session_start(self, _event: Any) -> None:
        self.online.set()
        for hook in list(self.on_start):
            try:
                result = hook()
                if result is not None:
                    await result
            except Exception:
                log.exception("session start hook failed")
        self._settle()

    def _on_connection_failed(self, error: Any) -> None:
        # Stop slixmpp's own retry loop (its back-off grows to minutes); the
        # reconnector below retries on a short, capped schedule instead.
        self.xmpp.cancel_connection_attempt()
        self._settle(Unavailable(f"cannot reach the XMPP server at {self.address}: {error}"))

    def _on_bad_certificate(self, error: Any) -> None:
        self._settle(Unavailable(
            f"the TLS certificate of {self.address} failed verification: {error}"))
        self.xmpp.abort()

    def _on_auth_failed(self, _event: Any) -> None:
        self._settle(AuthenticationFailed(
            f"the XMPP server at {self.address} refused the login of {self.settings.jid}"
        ))

    def _on_disconnected(self, reason: Any) -> None:
        was_online = self.online.is_set()
        self.online.clear()
        if self._attempt is not None:
            # A failed TLS handshake closes the connection a moment before it
            # raises; give that more telling error the chance to come first.
            asyncio.get_running_loop().call_later(0.1, self._settle, Unavailable(
                f"the XMPP server at {self.address} closed the connection"))
        self._fail_pending(Unavailable(f"lost the connection to {self.address}"))
        if was_online:
            for hook in list(self.on_stop):
                try:
                    hook()
                except Exception:
                    log.exception("session stop hook failed")
        if was_online and self.reconnect and not self._closing:
            self._reconnector = asyncio.ensure_future(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = 0.1
        while not self._closing and not self.online.is_set():
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                await self._connect_once(self.settings.timeout)
                log.info("reconnected to %s as %s", self.address, self.jid)
                return
            except KvError as error:
                log.info("reconnect failed: %s", error)
            delay = min(delay * 2, 2.0)

    async def wait_online(self, timeout: float) -> None:
        if self.online.is_set():
            return
        if self._closing:
            raise Unavailable("the session is closed")
        try:
            async with asyncio.timeout(timeout):
                await self.online.wait()
        except TimeoutError:
            raise Unavailable(
                f"not connected to the XMPP server at {self.address} (waited {timeout:g}s)"
            ) from None

    async def close(self) -> None:
        self._closing = True
        if self._reconnector is not None:
            self._reconnector.cancel()
        self._fail_pending(Unavailable("the session was closed"))
        if self.xmpp.transport is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self.xmpp.disconnect(wait=1.0)
            except (TimeoutError, Exception):
                self.xmpp.abort()
        self.xmpp.cancel_connection_attempt()
        self.online.clear()
        # slixmpp leaves its send loop running after a disconnect; end it so
        # that closing the event loop finds nothing pending.
        sender = getattr(self.xmpp, "_run_out_filters", None)
        if sender is not None and not sender.done():
            sender.cancel()

    # --- the fast lane ---------------------------------------------------

    def route(self, tag: str, handler: Route) -> None:
        """Hand IQ get/set stanzas whose payload is ``tag`` to ``handler``."""
        self.routes[tag] = handler

    def _dispatch(self, xml: ET.Element) -> bool:
        """Take an incoming stanza if it is ours; False leaves it to slixmpp."""
        if xml.tag != IQ_TAG:
            return False
        kind = xml.get("type")
        if kind == "result" or kind == "error":
            entry = self._pending.get(xml.get("id", ""))
            if entry is None:
                return False
            self._on_answer(xml, *entry)
            return True
        if kind != "get" and kind != "set":
            return False
        for payload in xml:
            handler = self.routes.get(payload.tag)
            if handler is None:
                return False
            try:
                handler(Inbound(xml, payload))
            except Exception:
                log.exception("handling <%s/> failed", payload.tag)
            return True
        return False

    def _on_ping(self, request: Inbound) -> None:
        self.reply(request)

    def new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def iq(self, to: str | JID, type_: str,
           payload: ET.Element | str | None = None) -> OutboundIq:
        return OutboundIq(str(to), type_, payload)

    async def request(self, iq: OutboundIq, timeout: float | None = None) -> ET.Element:
        """Send ``iq`` and return its answer's XML; raise the error it got, or Timeout."""
        timeout = timeout or self.settings.timeout
        if not self.online.is_set():
            await self.wait_online(timeout)
        return await self.send_iq(iq, timeout)

    def send_iq(self, iq: OutboundIq, timeout: float) -> asyncio.Future[ET.Element]:
        """Send ``iq`` now; the future gets its answer's XML, its error, or Timeout."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ET.Element] = loop.create_future()
        if not self.online.is_set() or self.xmpp.transport is None:
            future.set_exception(Unavailable(f"not connected to {self.address}"))
            return future
        iq_id = self.new_id()
        # The answer (or the timer) settles the entry: no done-callback, which
        # would cost the event loop one more handle per request.
        timer = loop.call_later(timeout, self._expire, iq_id, timeout)
        self._pending[iq_id] = (future, iq.to, timer)
        self._write(
            f"<iq type='{iq.type}' id='{iq_id}' to='{xmltext.escape_attribute(iq.to)}'>"
            f"{_payload_text(iq.payload)}</iq>"
        )
        return future

    def _on_answer(self, xml: ET.Element, future: asyncio.Future[ET.Element],
                   expected: str | None, timer: asyncio.TimerHandle) -> None:
        if expected is not None and xml.get("from") != expected and \
                JID(xml.get("from", "")) != JID(expected):
            log.warning("dropping an answer to %s from %s, sent to %s",
                        xml.get("id"), xml.get("from"), expected)
            return
        self._pending.pop(xml.get("id", ""), None)
        timer.cancel()
        if future.done():
            return
        if xml.get("type") == "result":
            future.set_result(xml)
        else:
            future.set_exception(wire.parse_error(xml.find(ERROR_TAG)))

    def _expire(self, iq_id: str, timeout: float) -> None:
        entry = self._pending.pop(iq_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(
                Timeout(f"no answer from {entry[1] or 'the server'} within {timeout:g}s"))

    def _fail_pending(self, error: KvError) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for future, _, timer in pending:
            timer.cancel()
            if not future.done():
                future.set_exception(type(error)(str(error)))

    def reply(self, request: Inbound, payload: ET.Element | str | None = None,
              type_: str = "result") -> None:
        """Answer ``request`` (dropped quietly if the connection is gone)."""
        if self.xmpp.transport is None:
            return
        to = request.sender
        recipient = f" to='{xmltext.escape_attribute(to)}'" if to else ""
        self._write(
            f"<iq type='{type_}' id='{xmltext.escape_attribute(request.id)}'{recipient}>"
            f"{_payload_text(payload)}</iq>"
        )

    def send_together(self) -> None:
        """Hold what this session sends until the callbacks already queued have run.

        Then it goes out in one write. For a burst that is ready at one moment
        (the answers to the writes of one group commit, whose callbacks the
        commit has just queued): one system call instead of one per answer,
        and Prosody reads them in one go. The event loop runs callbacks in the
        order they were queued, so the release comes right after the burst.
        Answers produced one by one as requests arrive are not held: sending
        each at once lets Prosody route it while the next is made.
        """
        if self._held is None:
            self._held = []
            asyncio.get_running_loop().call_soon(self._send_held)

    def _send_held(self) -> None:
        held, self._held = self._held, None
        if held and self.xmpp.transport is not None:
            self.xmpp.send_raw("".join(held))

    def _write(self, text: str) -> None:
        if self._held is not None:
            self._held.append(text)
        else:
            self.xmpp.send_raw(text)

    def reply_error(self, request: Inbound, error: KvError) -> None:
        self.reply(request, error_element(error), "error")

    def send(self, stanza: Any) -> None:
        self.xmpp.send(stanza)


async def create_account(settings: ConnectionSettings, timeout: float = 10.0) -> bool:
    """Create ``settings.jid`` with its password by in-band registration (XEP-0077).

    Returns True if the account was created, False if it already existed (and
    the password works). Raises Unavailable if the server is down or refuses.
    """
    session = Session(settings, reconnect=False, plugins=("xep_0077",))
    xmpp = session.xmpp
    xmpp["xep_0077"].force_registration = True
    created: list[bool] = []

    async def register(_form: Any) -> None:
        request = xmpp.Iq()
        request["type"] = "set"
        request["register"]["username"] = xmpp.boundjid.user
        request["register"]["password"] = settings.password
        try:
            await request.send(timeout=timeout)
            created.append(True)
        except IqError as error:
            if error.condition != "conflict":
                log.warning("registration of %s refused: %s", settings.jid, error.condition)

    xmpp.add_event_handler("register", register)
    try:
        await session.start(timeout)
    finally:
        await session.close()
    return bool(created)
